/*
 * Thin C layer over the libjpeg API (linked against libjpeg-turbo).
 *
 * libjpeg reports fatal errors through longjmp; unwinding through Rust frames
 * is undefined behaviour, so every libjpeg call and its setjmp live here and
 * Rust only sees plain return codes and a message buffer.
 *
 * Decoding mirrors Pillow's JPEG decoder so that pixels match it exactly:
 * default (ISLOW) DCT, fancy upsampling, one scanline per read, warnings
 * ignored, an EOI marker appended once when the data runs out (Pillow does
 * this under LOAD_TRUNCATED_IMAGES) and suspension after that, and rows not
 * decoded before an error left untouched (the caller zero-fills them).
 */
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#define SPJ_OK 0
#define SPJ_ERROR 1     /* libjpeg error before any pixels could be produced */
#define SPJ_SUSPENDED 2 /* data ended inside the headers */
#define SPJ_PARTIAL 3   /* pixel decoding stopped early; rows_done tells how far */
#define SPJ_BAD_ARGS 4

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *msg;
    size_t msg_len;
} spj_error_mgr;

typedef struct {
    struct jpeg_source_mgr pub;
    int eoi_sent;
    size_t skip_pending;
} spj_source_mgr;

typedef struct {
    struct jpeg_progress_mgr pub;
    int max_scans;
} spj_progress_mgr;

typedef struct {
    uint32_t width;
    uint32_t height;
    int32_t components;  /* as stored in the frame header (1, 3, 4, ...) */
    int32_t color_space; /* libjpeg J_COLOR_SPACE of the file */
    int32_t progressive;
    int32_t adobe;       /* 1 when an Adobe APP14 marker was seen */
} spj_info;

static const JOCTET spj_eoi[2] = {0xFF, 0xD9};

static void spj_error_exit(j_common_ptr cinfo) {
    spj_error_mgr *err = (spj_error_mgr *)cinfo->err;
    char buffer[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buffer);
    if (err->msg != NULL && err->msg_len > 0) {
        snprintf(err->msg, err->msg_len, "%s", buffer);
    }
    longjmp(err->jump, 1);
}

/* Pillow discards libjpeg warnings (corrupt data, premature end); so do we. */
static void spj_output_message(j_common_ptr cinfo) { (void)cinfo; }

static void spj_init_source(j_decompress_ptr cinfo) { (void)cinfo; }

static boolean spj_fill_input_buffer(j_decompress_ptr cinfo) {
    spj_source_mgr *src = (spj_source_mgr *)cinfo->src;
    if (src->eoi_sent) {
        return FALSE; /* suspend: no more data, as Pillow's reader stops here */
    }
    src->eoi_sent = 1;
    /* A skip that ran past the end swallows (part of) the appended marker. */
    if (src->skip_pending >= 2) {
        src->skip_pending = 0;
        return FALSE;
    }
    src->pub.next_input_byte = spj_eoi + src->skip_pending;
    src->pub.bytes_in_buffer = 2 - src->skip_pending;
    src->skip_pending = 0;
    return TRUE;
}

static void spj_skip_input_data(j_decompress_ptr cinfo, long num_bytes) {
    spj_source_mgr *src = (spj_source_mgr *)cinfo->src;
    if (num_bytes <= 0) {
        return;
    }
    if ((size_t)num_bytes > src->pub.bytes_in_buffer) {
        if (!src->eoi_sent) {
            src->skip_pending = (size_t)num_bytes - src->pub.bytes_in_buffer;
        }
        src->pub.next_input_byte += src->pub.bytes_in_buffer;
        src->pub.bytes_in_buffer = 0;
    } else {
        src->pub.next_input_byte += num_bytes;
        src->pub.bytes_in_buffer -= (size_t)num_bytes;
    }
}

static void spj_term_source(j_decompress_ptr cinfo) { (void)cinfo; }

/* Bounds the work a hostile progressive file can cause (thousands of scans). */
static void spj_progress(j_common_ptr cinfo) {
    spj_progress_mgr *prog = (spj_progress_mgr *)cinfo->progress;
    if (cinfo->is_decompressor) {
        j_decompress_ptr dinfo = (j_decompress_ptr)cinfo;
        if (dinfo->progressive_mode && prog->max_scans > 0 &&
            dinfo->input_scan_number > prog->max_scans) {
            spj_error_mgr *err = (spj_error_mgr *)cinfo->err;
            if (err->msg != NULL && err->msg_len > 0) {
                snprintf(err->msg, err->msg_len,
                         "progressive JPEG has more than %d scans", prog->max_scans);
            }
            longjmp(err->jump, 2);
        }
    }
}

typedef struct {
    struct jpeg_decompress_struct cinfo;
    spj_error_mgr err;
    spj_source_mgr src;
    spj_progress_mgr progress;
} spj_state;

static void spj_setup(spj_state *st, const uint8_t *data, size_t len, char *msg, size_t msg_len,
                      int max_scans) {
    memset(st, 0, sizeof(*st));
    st->cinfo.err = jpeg_std_error(&st->err.pub);
    st->err.pub.error_exit = spj_error_exit;
    st->err.pub.output_message = spj_output_message;
    st->err.msg = msg;
    st->err.msg_len = msg_len;
    if (msg != NULL && msg_len > 0) {
        msg[0] = '\0';
    }
    st->src.pub.init_source = spj_init_source;
    st->src.pub.fill_input_buffer = spj_fill_input_buffer;
    st->src.pub.skip_input_data = spj_skip_input_data;
    st->src.pub.resync_to_restart = jpeg_resync_to_restart;
    st->src.pub.term_source = spj_term_source;
    st->src.pub.next_input_byte = data;
    st->src.pub.bytes_in_buffer = len;
    st->progress.pub.progress_monitor = spj_progress;
    st->progress.max_scans = max_scans;
}

static void spj_fill_info(const struct jpeg_decompress_struct *cinfo, spj_info *info) {
    info->width = cinfo->image_width;
    info->height = cinfo->image_height;
    info->components = cinfo->num_components;
    info->color_space = (int32_t)cinfo->jpeg_color_space;
    info->progressive = cinfo->progressive_mode ? 1 : 0;
    info->adobe = cinfo->saw_Adobe_marker ? 1 : 0;
}

/* Reads the markers up to the first scan and reports the frame header. */
int spj_read_header(const uint8_t *data, size_t len, spj_info *info, char *msg, size_t msg_len) {
    spj_state st;
    int rc;
    if (data == NULL || info == NULL) {
        return SPJ_BAD_ARGS;
    }
    spj_setup(&st, data, len, msg, msg_len, 0);
    if (setjmp(st.err.jump)) {
        jpeg_destroy_decompress(&st.cinfo);
        return SPJ_ERROR;
    }
    jpeg_create_decompress(&st.cinfo);
    st.cinfo.src = &st.src.pub;
    rc = jpeg_read_header(&st.cinfo, TRUE);
    if (rc != JPEG_HEADER_OK) {
        jpeg_destroy_decompress(&st.cinfo);
        if (msg != NULL && msg_len > 0) {
            snprintf(msg, msg_len, "JPEG data ends inside the headers");
        }
        return SPJ_SUSPENDED;
    }
    spj_fill_info(&st.cinfo, info);
    jpeg_destroy_decompress(&st.cinfo);
    return SPJ_OK;
}

/*
 * Decodes rows [first_row, end_row) into `out` ((end_row - first_row) * width *
 * out_components bytes, zero-filled by the caller); rows before first_row are
 * skipped with jpeg_skip_scanlines (entropy-decoded only), so several calls
 * can decode bands of one baseline image in parallel. out_components selects the output space as Pillow does from the
 * component count: 1 -> grey, 3 -> RGB, 4 -> CMYK (inverted Adobe values as
 * stored). `expect` must match the header read before (guards against
 * the caller sizing `out` from a different file).
 */
int spj_decode_rows(const uint8_t *data, size_t len, const spj_info *expect, uint32_t first_row,
                    uint32_t end_row, uint8_t *out, size_t out_len, int max_scans,
                    uint32_t *rows_done, char *msg, size_t msg_len) {
    /* volatile: read after longjmp */
    volatile uint32_t done = 0;
    spj_state st;
    int jumped;
    volatile J_COLOR_SPACE space;
    size_t stride;
    if (data == NULL || expect == NULL || out == NULL || rows_done == NULL) {
        return SPJ_BAD_ARGS;
    }
    *rows_done = 0;
    switch (expect->components) {
    case 1: space = JCS_GRAYSCALE; break;
    case 3: space = JCS_RGB; break;
    case 4: space = JCS_CMYK; break;
    default: return SPJ_BAD_ARGS;
    }
    stride = (size_t)expect->width * (size_t)expect->components;
    if (expect->width == 0 || expect->height == 0 || first_row >= end_row ||
        end_row > expect->height || out_len / stride < (size_t)(end_row - first_row)) {
        return SPJ_BAD_ARGS;
    }
    spj_setup(&st, data, len, msg, msg_len, max_scans);
    jumped = setjmp(st.err.jump);
    if (jumped) {
        int had_header = st.cinfo.global_state != 0 && st.cinfo.image_width != 0;
        *rows_done = done;
        jpeg_destroy_decompress(&st.cinfo);
        /* jumped == 2: the scan limit, a refusal rather than damaged data */
        return (jumped == 1 && had_header) ? SPJ_PARTIAL : SPJ_ERROR;
    }
    jpeg_create_decompress(&st.cinfo);
    st.cinfo.src = &st.src.pub;
    st.cinfo.progress = &st.progress.pub;
    if (jpeg_read_header(&st.cinfo, TRUE) != JPEG_HEADER_OK) {
        jpeg_destroy_decompress(&st.cinfo);
        if (msg != NULL && msg_len > 0) {
            snprintf(msg, msg_len, "JPEG data ends inside the headers");
        }
        return SPJ_SUSPENDED;
    }
    if (st.cinfo.image_width != expect->width || st.cinfo.image_height != expect->height ||
        st.cinfo.num_components != expect->components) {
        jpeg_destroy_decompress(&st.cinfo);
        return SPJ_BAD_ARGS;
    }
    st.cinfo.out_color_space = space;
    if (!jpeg_start_decompress(&st.cinfo)) {
        /* Suspended while buffering a multi-scan image: nothing was output. */
        jpeg_destroy_decompress(&st.cinfo);
        return SPJ_PARTIAL;
    }
    if (st.cinfo.output_width != expect->width || st.cinfo.output_height != expect->height ||
        st.cinfo.output_components != expect->components) {
        jpeg_destroy_decompress(&st.cinfo);
        return SPJ_BAD_ARGS;
    }
    if (first_row > 0 && jpeg_skip_scanlines(&st.cinfo, first_row) != first_row) {
        jpeg_destroy_decompress(&st.cinfo);
        return SPJ_PARTIAL;
    }
    done = first_row;
    while (st.cinfo.output_scanline < end_row) {
        JSAMPROW row = out + (size_t)(st.cinfo.output_scanline - first_row) * stride;
        if (jpeg_read_scanlines(&st.cinfo, &row, 1) != 1) {
            break; /* suspended: the data ran out */
        }
        done = st.cinfo.output_scanline;
    }
    *rows_done = done;
    /* All rows out but only thanks to the appended EOI: the file was cut short. */
    if (done < end_row || st.src.eoi_sent) {
        jpeg_destroy_decompress(&st.cinfo);
        return SPJ_PARTIAL;
    }
    /* Trailing data is irrelevant to the pixels; skip jpeg_finish_decompress. */
    jpeg_destroy_decompress(&st.cinfo);
    return SPJ_OK;
}
