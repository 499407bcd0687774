"""spacer_core.limits and spacer_core.cancellation, and the engine's long-work share."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.config import ServerConfig
from server.dataplane import Engine
from spacer_core import cancellation, limits
from spacer_core.data_classes import ImageFeatures
from spacer_core.limits import LimitExceededError, Limits
from spacer_core.train_classifier import MiniBatchTrainer
from tests.support.hostile_files import lying_header, zip_bomb


def test_feature_file_inflation_is_checked_before_reading(tmp_path):
    zip_bomb(tmp_path / "bomb", 20)
    lying_header(tmp_path / "liar")
    small = ImageFeatures.from_arrays(np.ones((3, 8), np.float32), [0, 1, 2], [0, 1, 2]).to_bytes()
    bounded = Limits(max_feature_file_bytes=10 << 20)
    for name in ("bomb", "liar"):
        with pytest.raises(LimitExceededError):
            bounded.check_npz((tmp_path / name).read_bytes(), name)
    bounded.check_npz(small, "small")
    with limits.limits_scope(bounded), pytest.raises(LimitExceededError, match="bomb"):
        ImageFeatures.from_bytes((tmp_path / "bomb").read_bytes(), "bomb")
    assert ImageFeatures.from_bytes(small).feature_dim == 8


def test_task_and_json_checks_name_the_field():
    bounded = Limits(
        max_epochs=10, max_hidden_units=100, max_hidden_layers=2, max_token_chars=4, max_key_chars=8
    )

    class Task:
        job_token = "ok"
        nbr_epochs = 11
        trainer = MiniBatchTrainer()

    with pytest.raises(
        LimitExceededError, match=r"tasks\[0\]\.nbr_epochs is 11; this server allows at most 10"
    ):
        bounded.check_task(Task(), "tasks[0]")
    Task.nbr_epochs = 10
    Task.trainer = MiniBatchTrainer(mlp_hidden_layer_sizes=(100, 101))
    with pytest.raises(LimitExceededError, match=r"mlp_hidden_layer_sizes\[1\] is 101"):
        bounded.check_task(Task())
    Task.trainer = MiniBatchTrainer(mlp_hidden_layer_sizes=(1, 1, 1))
    with pytest.raises(LimitExceededError, match=r"\(layers\) is 3"):
        bounded.check_task(Task())
    with pytest.raises(LimitExceededError, match=r"job\.tasks\[1\]\.job_token"):
        bounded.check_json({"tasks": [{"job_token": "a"}, {"job_token": "abcde"}]}, "job")
    with pytest.raises(LimitExceededError, match=r"job\.tasks\[0\]\.image_loc\.key"):
        bounded.check_json({"tasks": [{"image_loc": {"key": "123456789"}}]}, "job")
    Limits().check_task(Task())  # the library's defaults: unbounded, as pyspacer


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("job_token", 5, "job_token must be text"),
        ("job_token", ["a"] * 3, "job_token must be text"),
        ("nbr_epochs", True, "nbr_epochs must be a whole number"),
        ("nbr_epochs", "2", "nbr_epochs must be a whole number"),
        ("nbr_epochs", 2.5, "nbr_epochs must be a whole number"),
        ("nbr_epochs", None, "nbr_epochs must be a whole number"),
        ("feature_cache_dir", 5, "feature_cache_dir must be text"),
        ("feature_cache_dir", ["x"], "feature_cache_dir must be text"),
        ("mlp_hidden_layer_sizes", "abc", "must be a list of whole numbers"),
        ("mlp_hidden_layer_sizes", [100.5], r"mlp_hidden_layer_sizes\[0\] must be a whole number"),
    ],
)
def test_task_values_of_the_wrong_type_are_refused_by_name(field, value, fragment):
    """A client's JSON can put anything anywhere: a wrong type is refused before work, never
    slipping past a limit (a token that is a list) or failing halfway (epochs as text)."""
    from spacer_core.exceptions import InvalidInputError

    class Task:
        job_token = "ok"
        nbr_epochs = 3
        trainer = MiniBatchTrainer()

    if field == "mlp_hidden_layer_sizes":
        Task.trainer = MiniBatchTrainer()
        Task.trainer.mlp_hidden_layer_sizes = value
    else:
        setattr(Task, field, value)
    with pytest.raises(InvalidInputError, match=fragment):
        Limits(max_token_chars=4).check_task(Task(), "tasks[0]")
    if field == "job_token":
        with pytest.raises(InvalidInputError, match=fragment):
            Limits().check_json({"tasks": [{"job_token": value}]}, "job")


def test_cancellation_checks_flag_and_deadline():
    cancellation.check()  # outside a scope: never raises
    stop = threading.Event()
    with cancellation.cancel_scope(stop):
        cancellation.check()
        stop.set()
        with pytest.raises(cancellation.WorkCancelledError, match="cancelled"):
            cancellation.check()
    with cancellation.cancel_scope(threading.Event(), time.monotonic() - 1):
        with pytest.raises(cancellation.WorkCancelledError, match="deadline"):
            cancellation.check()


def test_long_work_holds_a_bounded_share_and_stops_when_its_call_ends():
    engine = Engine(ServerConfig(workers=4, log_level="WARNING", allow_any_path=True))
    assert engine.config.long_work_slots == 2
    running, peak, stopped = [0], [0], []
    lock = threading.Lock()

    def work(name: str) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            for _ in range(400):
                cancellation.check()
                time.sleep(0.01)
        except cancellation.WorkCancelledError:
            stopped.append(name)
            raise
        finally:
            with lock:
                running[0] -= 1

    async def scenario() -> None:
        calls = [asyncio.ensure_future(engine.call_long(work, f"w{i}")) for i in range(4)]
        await asyncio.sleep(0.3)
        assert running[0] == 2  # two wait for a slot
        quick = await asyncio.wait_for(engine.call(lambda: "free worker"), 2)
        assert quick == "free worker"
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        for _ in range(100):
            if running[0] == 0:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert peak[0] == 2
    assert running[0] == 0
    assert sorted(stopped) == [
        "w0",
        "w1",
    ]  # the two running ones stopped at a check; the others never started


def test_image_limits_belong_to_the_runtime_not_the_process():
    from spacer_core import config as core_config
    from spacer_core.exceptions import DataLimitError
    from spacer_core.task_utils import check_extract_inputs

    class Image:
        size = (40, 30)

    before = (core_config.MAX_IMAGE_PIXELS, core_config.MAX_POINTS_PER_IMAGE)
    config = ServerConfig(max_image_pixels=40 * 30 - 1, max_points_per_image=2).validate()
    bounded = config.runtime_settings().limits
    assert (bounded.image_pixels, bounded.points_per_image) == (40 * 30 - 1, 2)
    with limits.limits_scope(bounded):
        with pytest.raises(DataLimitError, match="max allowed of 1199"):
            check_extract_inputs(Image(), [(1, 1)], "small.png")
    check_extract_inputs(Image(), [(1, 1)] * 3, "small.png")
    assert (core_config.MAX_IMAGE_PIXELS, core_config.MAX_POINTS_PER_IMAGE) == before
    # Unset, the library's (pyspacer's) settings apply, read at call time.
    assert Limits().image_pixels == core_config.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels"):
        ServerConfig(max_image_pixels=0).validate()


def test_server_maps_its_queue_delay_onto_the_batcher_settings():
    from spacer_core.inference import BatcherSettings

    server = ServerConfig().runtime_settings().batcher
    assert (server.queue_delay_ms, server.max_batch_size) == (5.0, None)
    assert ServerConfig(queue_delay_ms=0, batch_size=4).runtime_settings().batcher == BatcherSettings(
        max_batch_size=4, queue_delay_ms=0
    )


def test_fast_recheck_margin_reaches_the_runtime_and_check_config(capsys):
    import argparse

    from server.config import add_arguments, config_from_args
    from shell.serve import effective_settings
    from spacer_core.runtime import DEFAULT_FAST_RECHECK_MARGIN

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--precision", "fast", "--fast-recheck-margin", "0.25"]), {})
    assert config.runtime_settings().fast_recheck_margin == 0.25
    assert effective_settings(config)["server"]["fast_recheck_margin"] == 0.25
    from_env = config_from_args(parser.parse_args([]), {"SPACER_FAST_RECHECK_MARGIN": "0"})
    assert from_env.runtime_settings().fast_recheck_margin == 0.0
    assert ServerConfig().runtime_settings().fast_recheck_margin == DEFAULT_FAST_RECHECK_MARGIN
    with pytest.raises(ValueError, match="fast recheck margin"):
        ServerConfig(fast_recheck_margin=1.5).validate()
