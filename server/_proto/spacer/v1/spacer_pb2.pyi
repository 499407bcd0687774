from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BULK: _ClassVar[Priority]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BULK: Priority

class DataLocation(_message.Message):
    __slots__ = ("storage_type", "key", "bucket_name")
    STORAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BUCKET_NAME_FIELD_NUMBER: _ClassVar[int]
    storage_type: str
    key: str
    bucket_name: str
    def __init__(self, storage_type: _Optional[str] = ..., key: _Optional[str] = ..., bucket_name: _Optional[str] = ...) -> None: ...

class Extractor(_message.Message):
    __slots__ = ("class_path", "data_locations", "data_hashes")
    class DataLocationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: DataLocation
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[DataLocation, _Mapping]] = ...) -> None: ...
    class DataHashesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLASS_PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_HASHES_FIELD_NUMBER: _ClassVar[int]
    class_path: str
    data_locations: _containers.MessageMap[str, DataLocation]
    data_hashes: _containers.ScalarMap[str, str]
    def __init__(self, class_path: _Optional[str] = ..., data_locations: _Optional[_Mapping[str, DataLocation]] = ..., data_hashes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RowCol(_message.Message):
    __slots__ = ("row", "col")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    row: int
    col: int
    def __init__(self, row: _Optional[int] = ..., col: _Optional[int] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class PointFeatures(_message.Message):
    __slots__ = ("row", "col", "data")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    row: int
    col: int
    data: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, row: _Optional[int] = ..., col: _Optional[int] = ..., data: _Optional[_Iterable[float]] = ...) -> None: ...

class ImageFeatures(_message.Message):
    __slots__ = ("point_features", "valid_rowcol", "feature_dim", "npoints")
    POINT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    VALID_ROWCOL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    NPOINTS_FIELD_NUMBER: _ClassVar[int]
    point_features: _containers.RepeatedCompositeFieldContainer[PointFeatures]
    valid_rowcol: bool
    feature_dim: int
    npoints: int
    def __init__(self, point_features: _Optional[_Iterable[_Union[PointFeatures, _Mapping]]] = ..., valid_rowcol: _Optional[bool] = ..., feature_dim: _Optional[int] = ..., npoints: _Optional[int] = ...) -> None: ...

class PointScores(_message.Message):
    __slots__ = ("row", "col", "scores")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    row: int
    col: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, row: _Optional[int] = ..., col: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ExtractFeaturesRequest(_message.Message):
    __slots__ = ("job_token", "extractor", "rowcols", "image_loc", "image_bytes", "feature_loc", "return_features", "priority")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    ROWCOLS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LOC_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LOC_FIELD_NUMBER: _ClassVar[int]
    RETURN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    extractor: Extractor
    rowcols: _containers.RepeatedCompositeFieldContainer[RowCol]
    image_loc: DataLocation
    image_bytes: bytes
    feature_loc: DataLocation
    return_features: bool
    priority: Priority
    def __init__(self, job_token: _Optional[str] = ..., extractor: _Optional[_Union[Extractor, _Mapping]] = ..., rowcols: _Optional[_Iterable[_Union[RowCol, _Mapping]]] = ..., image_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., image_bytes: _Optional[bytes] = ..., feature_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., return_features: _Optional[bool] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class ExtractFeaturesResponse(_message.Message):
    __slots__ = ("job_token", "extractor_loaded_remotely", "runtime", "features")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_LOADED_REMOTELY_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    extractor_loaded_remotely: bool
    runtime: float
    features: ImageFeatures
    def __init__(self, job_token: _Optional[str] = ..., extractor_loaded_remotely: _Optional[bool] = ..., runtime: _Optional[float] = ..., features: _Optional[_Union[ImageFeatures, _Mapping]] = ...) -> None: ...

class ClassifyFeaturesRequest(_message.Message):
    __slots__ = ("job_token", "feature_loc", "classifier_loc")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LOC_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_LOC_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    feature_loc: DataLocation
    classifier_loc: DataLocation
    def __init__(self, job_token: _Optional[str] = ..., feature_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., classifier_loc: _Optional[_Union[DataLocation, _Mapping]] = ...) -> None: ...

class ClassifyImageRequest(_message.Message):
    __slots__ = ("job_token", "extractor", "rowcols", "image_loc", "image_bytes", "classifier_loc", "priority")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    ROWCOLS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LOC_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_LOC_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    extractor: Extractor
    rowcols: _containers.RepeatedCompositeFieldContainer[RowCol]
    image_loc: DataLocation
    image_bytes: bytes
    classifier_loc: DataLocation
    priority: Priority
    def __init__(self, job_token: _Optional[str] = ..., extractor: _Optional[_Union[Extractor, _Mapping]] = ..., rowcols: _Optional[_Iterable[_Union[RowCol, _Mapping]]] = ..., image_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., image_bytes: _Optional[bytes] = ..., classifier_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("job_token", "runtime", "scores", "classes", "valid_rowcol")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    VALID_ROWCOL_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    runtime: float
    scores: _containers.RepeatedCompositeFieldContainer[PointScores]
    classes: _containers.RepeatedCompositeFieldContainer[Label]
    valid_rowcol: bool
    def __init__(self, job_token: _Optional[str] = ..., runtime: _Optional[float] = ..., scores: _Optional[_Iterable[_Union[PointScores, _Mapping]]] = ..., classes: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., valid_rowcol: _Optional[bool] = ...) -> None: ...

class ClassifyImagesResponse(_message.Message):
    __slots__ = ("job_token", "result", "error")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    result: ClassifyResponse
    error: Error
    def __init__(self, job_token: _Optional[str] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Annotation(_message.Message):
    __slots__ = ("row", "col", "label")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    row: int
    col: int
    label: Label
    def __init__(self, row: _Optional[int] = ..., col: _Optional[int] = ..., label: _Optional[_Union[Label, _Mapping]] = ...) -> None: ...

class ImageAnnotations(_message.Message):
    __slots__ = ("feature_loc", "annotations")
    FEATURE_LOC_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    feature_loc: DataLocation
    annotations: _containers.RepeatedCompositeFieldContainer[Annotation]
    def __init__(self, feature_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., annotations: _Optional[_Iterable[_Union[Annotation, _Mapping]]] = ...) -> None: ...

class ImageLabels(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageAnnotations]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageAnnotations, _Mapping]]] = ...) -> None: ...

class TrainingTaskLabels(_message.Message):
    __slots__ = ("train", "ref", "val")
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    VAL_FIELD_NUMBER: _ClassVar[int]
    train: ImageLabels
    ref: ImageLabels
    val: ImageLabels
    def __init__(self, train: _Optional[_Union[ImageLabels, _Mapping]] = ..., ref: _Optional[_Union[ImageLabels, _Mapping]] = ..., val: _Optional[_Union[ImageLabels, _Mapping]] = ...) -> None: ...

class TrainClassifierRequest(_message.Message):
    __slots__ = ("job_token", "trainer", "nbr_epochs", "clf_type", "labels", "previous_model_locs", "model_loc", "valresult_loc", "feature_cache_dir")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    NBR_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CLF_TYPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_MODEL_LOCS_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOC_FIELD_NUMBER: _ClassVar[int]
    VALRESULT_LOC_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    trainer: str
    nbr_epochs: int
    clf_type: str
    labels: TrainingTaskLabels
    previous_model_locs: _containers.RepeatedCompositeFieldContainer[DataLocation]
    model_loc: DataLocation
    valresult_loc: DataLocation
    feature_cache_dir: str
    def __init__(self, job_token: _Optional[str] = ..., trainer: _Optional[str] = ..., nbr_epochs: _Optional[int] = ..., clf_type: _Optional[str] = ..., labels: _Optional[_Union[TrainingTaskLabels, _Mapping]] = ..., previous_model_locs: _Optional[_Iterable[_Union[DataLocation, _Mapping]]] = ..., model_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., valresult_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., feature_cache_dir: _Optional[str] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("epoch", "nbr_epochs", "ref_accuracy", "elapsed")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NBR_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    REF_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    nbr_epochs: int
    ref_accuracy: float
    elapsed: float
    def __init__(self, epoch: _Optional[int] = ..., nbr_epochs: _Optional[int] = ..., ref_accuracy: _Optional[float] = ..., elapsed: _Optional[float] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("acc", "pc_accs", "ref_accs", "runtime", "model_loc", "valresult_loc")
    ACC_FIELD_NUMBER: _ClassVar[int]
    PC_ACCS_FIELD_NUMBER: _ClassVar[int]
    REF_ACCS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOC_FIELD_NUMBER: _ClassVar[int]
    VALRESULT_LOC_FIELD_NUMBER: _ClassVar[int]
    acc: float
    pc_accs: _containers.RepeatedScalarFieldContainer[float]
    ref_accs: _containers.RepeatedScalarFieldContainer[float]
    runtime: float
    model_loc: DataLocation
    valresult_loc: DataLocation
    def __init__(self, acc: _Optional[float] = ..., pc_accs: _Optional[_Iterable[float]] = ..., ref_accs: _Optional[_Iterable[float]] = ..., runtime: _Optional[float] = ..., model_loc: _Optional[_Union[DataLocation, _Mapping]] = ..., valresult_loc: _Optional[_Union[DataLocation, _Mapping]] = ...) -> None: ...

class TrainClassifierResponse(_message.Message):
    __slots__ = ("job_token", "progress", "result")
    JOB_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    job_token: str
    progress: TrainProgress
    result: TrainResult
    def __init__(self, job_token: _Optional[str] = ..., progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., result: _Optional[_Union[TrainResult, _Mapping]] = ...) -> None: ...

class RunJobRequest(_message.Message):
    __slots__ = ("job_msg_json",)
    JOB_MSG_JSON_FIELD_NUMBER: _ClassVar[int]
    job_msg_json: str
    def __init__(self, job_msg_json: _Optional[str] = ...) -> None: ...

class RunJobResponse(_message.Message):
    __slots__ = ("job_return_msg_json", "ok", "error_message")
    JOB_RETURN_MSG_JSON_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_return_msg_json: str
    ok: bool
    error_message: str
    def __init__(self, job_return_msg_json: _Optional[str] = ..., ok: _Optional[bool] = ..., error_message: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("extractor", "classifier_loc")
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_LOC_FIELD_NUMBER: _ClassVar[int]
    extractor: Extractor
    classifier_loc: DataLocation
    def __init__(self, extractor: _Optional[_Union[Extractor, _Mapping]] = ..., classifier_loc: _Optional[_Union[DataLocation, _Mapping]] = ...) -> None: ...

class LoadedModel(_message.Message):
    __slots__ = ("kind", "name", "classes", "feature_dim", "load_seconds", "extractor_class", "weights_sha256", "loaded_by", "last_used")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_CLASS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOADED_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    classes: _containers.RepeatedCompositeFieldContainer[Label]
    feature_dim: int
    load_seconds: float
    extractor_class: str
    weights_sha256: str
    loaded_by: str
    last_used: float
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., feature_dim: _Optional[int] = ..., load_seconds: _Optional[float] = ..., extractor_class: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., loaded_by: _Optional[str] = ..., last_used: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ...) -> None: ...
