/* ldmrt.h: the C ABI of ldmrt's lean runtime (C99; usable from C++ and any C FFI).
 *
 * libldmrt hosts ldmrt's Python runtime in this process: the same code `ldmrt generate`, Triton
 * and every parity test run. It starts its own interpreter, or joins the one already running in
 * the process (a host that embeds Python, or ctypes).
 *
 *   ldmrt_pipeline *pipeline;
 *   if (ldmrt_open("out/digits", NULL, &pipeline) != LDMRT_OK) { puts(ldmrt_last_error()); ... }
 *   ldmrt_request request;
 *   ldmrt_request_init(&request);
 *   request.prompt = "a red 7 on a white background";
 *   ldmrt_result *result;
 *   if (ldmrt_generate(pipeline, &request, NULL, &result) == LDMRT_OK) {
 *       ... result->pixels: uint8 [batch, height, width, channels] ...
 *       ldmrt_result_free(result);
 *   }
 *   ldmrt_close(pipeline);
 *
 * Versioning: LDMRT_ABI_VERSION changes only when an existing field or function changes meaning.
 * New fields are added at the ends of structs; every struct the caller fills starts with
 * `struct_size` (set by its _init function), so a library reads only what the caller's header
 * knew and gives the rest their defaults. A struct larger than the library knows is refused
 * (LDMRT_ERR_ABI): the program was built against a newer ldmrt.h than the library.
 *
 * Ownership: every pointer the caller passes in is only read, and only during the call; the
 * library keeps no reference to it. Every pointer the library hands out (ldmrt_pipeline,
 * ldmrt_result and everything inside it, ldmrt_cancel) is owned by the library and freed by the
 * matching _close/_free/_destroy call; strings from ldmrt_last_error*() live until the next ldmrt
 * call on the same thread.
 *
 * Threads: every function may be called from any thread. One pipeline serves several threads at
 * once; each call's result equals the one it gets alone (the Python lock is released while a
 * backend runs). ldmrt_close must not race with calls on the same pipeline (as with free()).
 *
 * Errors: every function that can fail returns an ldmrt_status; on failure ldmrt_last_error()
 * says what was expected and what was found (the CLI's message), ldmrt_last_error_field() names
 * the caller's input at fault. Nothing is printed, nothing aborts the process.
 */
#ifndef LDMRT_H
#define LDMRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LDMRT_ABI_VERSION 1

#if defined(__GNUC__)
#define LDMRT_API __attribute__((visibility("default")))
#else
#define LDMRT_API
#endif

typedef enum ldmrt_status {
    LDMRT_OK = 0,
    LDMRT_ERR_INVALID_ARGUMENT = 1,    /* a request field or an option; ldmrt_last_error_field() names it */
    LDMRT_ERR_BUNDLE = 2,              /* the bundle is missing, corrupt or of an unknown schema */
    LDMRT_ERR_STALE_ENGINE = 3,        /* an engine built for another TensorRT, GPU or graph: `ldmrt build` */
    LDMRT_ERR_BACKEND_UNAVAILABLE = 4, /* the backend (its Python packages, a GPU) is not on this machine */
    LDMRT_ERR_CANCELLED = 5,           /* ldmrt_cancel_trigger stopped the call; no image */
    LDMRT_ERR_GENERATION = 6,          /* the models produced non-finite values, or similar */
    LDMRT_ERR_LORA = 7,                /* a LoRA file that cannot be read or does not fit */
    LDMRT_ERR_INSTALL = 8,             /* Python or ldmrt cannot be started or imported */
    LDMRT_ERR_ABI = 9,                 /* a struct_size this library does not know */
    LDMRT_ERR_IO = 10,                 /* a file could not be written or read */
    LDMRT_ERR_OUT_OF_MEMORY = 11,
    LDMRT_ERR_INTERNAL = 12            /* a bug in ldmrt: the message names the exception */
} ldmrt_status;

typedef enum ldmrt_dtype {
    LDMRT_DTYPE_FLOAT32 = 1,
    LDMRT_DTYPE_INT32 = 2,
    LDMRT_DTYPE_UINT8 = 3              /* images only: 0..255, read as value / 255 */
} ldmrt_dtype;

typedef enum ldmrt_tile {
    LDMRT_TILE_AUTO = -1,              /* tiles only when the image exceeds the VAE's exported range */
    LDMRT_TILE_NEVER = 0,
    LDMRT_TILE_ALWAYS = 1
} ldmrt_tile;

/* A caller's array, row-major and contiguous; data == NULL: not given. The caller promises that
 * data holds prod(shape[0..ndim-1]) elements of dtype (the library cannot check a C buffer). */
#define LDMRT_MAX_NDIM 4
typedef struct ldmrt_tensor {
    const void *data;
    int32_t dtype;                     /* ldmrt_dtype */
    int32_t ndim;
    int64_t shape[LDMRT_MAX_NDIM];
} ldmrt_tensor;

typedef void (*ldmrt_log_fn)(void *user_data, int32_t level, const char *message);  /* level: Python's logging levels */
/* After each denoising step; nonzero: stop the call there (LDMRT_ERR_CANCELLED), as a cancel would. */
typedef int32_t (*ldmrt_progress_fn)(void *user_data, int32_t done, int32_t total);

/* --- the interpreter ---------------------------------------------------------------------- */

typedef struct ldmrt_init_options {
    uint32_t struct_size;              /* sizeof(ldmrt_init_options): ldmrt_init_options_init sets it */
    /* The virtual environment with ldmrt installed. NULL: $LDMRT_VENV, else the one the library
     * was built from (`ldmrt embed --build`), else the interpreter's own paths. When joining a
     * running interpreter its site-packages are added to that interpreter's path. */
    const char *venv;
    int32_t install_signal_handlers;   /* 0 (default): Python leaves SIGINT and the others to the host */
    ldmrt_log_fn log;                  /* ldmrt's log records (warnings and above); NULL: dropped */
    void *log_user_data;
} ldmrt_init_options;

LDMRT_API int32_t ldmrt_abi_version(void);          /* LDMRT_ABI_VERSION of the library */
LDMRT_API const char *ldmrt_library_version(void);  /* "0.1.0": the ldmrt release the library comes with */
LDMRT_API void ldmrt_init_options_init(ldmrt_init_options *options);

/* Start (or join) the interpreter and import ldmrt; once per process, later calls return the
 * first one's status. NULL options: the defaults. ldmrt_open calls it with NULL when nobody did.
 * The interpreter lives until the process exits (CPython cannot be restarted in one process). */
LDMRT_API ldmrt_status ldmrt_init(const ldmrt_init_options *options);

/* --- pipelines ---------------------------------------------------------------------------- */

typedef struct ldmrt_pipeline ldmrt_pipeline;

typedef struct ldmrt_open_options {
    uint32_t struct_size;              /* sizeof(ldmrt_open_options) */
    const char *backend;               /* "onnxruntime" (NULL), "tensorrt", "tensorrt-rtx", "torch" */
    int32_t verify;                    /* 1 (default): sha256 of every file against the manifest */
    double max_cost;                  /* per-request limit on steps x images x megapixels; 0: none */
    /* The backend's own options as a JSON object, e.g. {"threads": 2} (onnxruntime: device,
     * threads, cache_dir; tensorrt: cuda_graphs, allow_version_compatible; torch: device, dtype,
     * cuda_graphs). NULL: none. */
    const char *backend_options;
} ldmrt_open_options;

LDMRT_API void ldmrt_open_options_init(ldmrt_open_options *options);

/* Open the bundle folder that `ldmrt export` wrote. NULL options: the defaults. */
LDMRT_API ldmrt_status ldmrt_open(const char *bundle, const ldmrt_open_options *options,
                                  ldmrt_pipeline **pipeline);
LDMRT_API void ldmrt_close(ldmrt_pipeline *pipeline);   /* NULL: nothing */

/* LoRA adapters applied on top of the bundle's weights without re-export: "FILE" or
 * "FILE:SCALE" each; count 0 restores the bundle's own weights. Waits for running requests. */
LDMRT_API ldmrt_status ldmrt_set_loras(ldmrt_pipeline *pipeline, const char *const *adapters, int32_t count);

/* --- generation --------------------------------------------------------------------------- */

/* Every field as GenerationRequest (docs/embedding.md); ldmrt_request_init sets the defaults:
 * NULL pointers, NaN in the fields marked "NaN:" and -1 ints mean "the default" (a NaN guidance or
 * eta is refused). Numbers are doubles: a value reaches the pipeline exactly as the CLI's flag would. */
typedef struct ldmrt_request {
    uint32_t struct_size;              /* sizeof(ldmrt_request) */
    const char *prompt;                /* UTF-8; NULL: "" */
    const char *negative_prompt;       /* NULL: "" (or zero embeddings where the model says so: SDXL) */
    const char *const *prompts;        /* one prompt per image (num_prompts > 0 replaces prompt) */
    int32_t num_prompts;
    const char *const *negative_prompts;
    int32_t num_negative_prompts;
    int32_t steps;                     /* 20 */
    double guidance;                   /* 7.5; <= 1: no classifier-free guidance (as diffusers) */
    const char *sampler;               /* NULL: the bundle's (its checkpoint's scheduler) */
    double eta;                        /* 0 */
    int64_t seed;                      /* 0 */
    int32_t height, width;             /* pixels; 0: the bundle's optimal size */
    int32_t batch;                     /* 1 */
    ldmrt_tensor latents;              /* float32 [B, C, h, w] unit-variance initial noise */
    ldmrt_tensor init_image;           /* img2img: [B or 1, H, W, 3] float32 in [0, 1] or uint8 */
    double strength;                   /* img2img; NaN: 0.8 */
    const int32_t *class_labels;       /* class-conditional models */
    int32_t num_class_labels;
    ldmrt_tensor image;                /* inpainting / super-resolution input [B or 1, H, W, 3] */
    ldmrt_tensor mask;                 /* inpainting [B or 1, H, W]; >= 0.5 is repainted */
    int32_t noise_level;               /* SD x4 upscaler; -1: 20 */
    ldmrt_tensor segmentation;         /* semantic synthesis: int32 class indices [B or 1, H, W] */
    int32_t tile;                      /* ldmrt_tile; LDMRT_TILE_AUTO */
    const char *layout_json;           /* layout-to-image: [{"class": id or name, "box": [x0, y0, x1, y1]}] */
    ldmrt_tensor guide_image;          /* post-hoc image guidance target [B or 1, h, w, 3] */
    double guide_scale;                /* NaN: the default */
    double guide_uncertainty;          /* NaN: the default */
    int32_t original_size[2];          /* SDXL size ids (height, width); {0, 0}: the image's */
    int32_t crops_coords_top_left[2];  /* {0, 0} */
    int32_t target_size[2];            /* {0, 0}: the image's */
    double aesthetic_score;            /* SDXL refiner; NaN: 6.0 */
    double negative_aesthetic_score;   /* NaN: 2.5 */
    double denoising_end;              /* SDXL base -> refiner hand-off; NaN: none */
    double denoising_start;            /* NaN: none */
    ldmrt_tensor init_latents;         /* the refiner: the base's latents */
} ldmrt_request;

LDMRT_API void ldmrt_request_init(ldmrt_request *request);

/* Cancelling from any thread (or a signal handler: trigger is one atomic store). A running
 * generate stops at its next check (before the text encoder, between steps, before the decoder)
 * with LDMRT_ERR_CANCELLED. A token stays triggered until reset. */
typedef struct ldmrt_cancel ldmrt_cancel;
LDMRT_API ldmrt_status ldmrt_cancel_create(ldmrt_cancel **cancel);
LDMRT_API void ldmrt_cancel_trigger(ldmrt_cancel *cancel);
LDMRT_API void ldmrt_cancel_reset(ldmrt_cancel *cancel);
LDMRT_API int32_t ldmrt_cancel_triggered(const ldmrt_cancel *cancel);
LDMRT_API void ldmrt_cancel_destroy(ldmrt_cancel *cancel);   /* not while a generate uses it */

typedef struct ldmrt_callbacks {
    uint32_t struct_size;              /* sizeof(ldmrt_callbacks) */
    ldmrt_progress_fn on_step;         /* after each denoising step, on the generating thread; may be NULL */
    void *user_data;
    ldmrt_cancel *cancel;              /* may be NULL */
} ldmrt_callbacks;

LDMRT_API void ldmrt_callbacks_init(ldmrt_callbacks *callbacks);

/* What a generate returns; owned by the library until ldmrt_result_free. */
typedef struct ldmrt_result {
    uint32_t struct_size;              /* sizeof the library's ldmrt_result: fields beyond the caller's header are new */
    int32_t batch, height, width, channels;   /* all 0 with denoising_end (latents only) */
    const uint8_t *pixels;             /* [batch, height, width, channels] uint8: the CLI's PNG pixels */
    const float *images;               /* the same layout, float32 in [0, 1] */
    int32_t latent_ndim;
    int64_t latent_shape[LDMRT_MAX_NDIM];
    const float *latents;              /* the final latents (scaled, before decoding) */
    const char *warnings;              /* "" or one warning per line */
    const char *timings_json;          /* {"denoise": seconds, ...} per stage */
} ldmrt_result;

/* callbacks may be NULL. On success *result is set; on failure it is NULL. */
LDMRT_API ldmrt_status ldmrt_generate(ldmrt_pipeline *pipeline, const ldmrt_request *request,
                                      const ldmrt_callbacks *callbacks, ldmrt_result **result);
LDMRT_API void ldmrt_result_free(ldmrt_result *result);   /* NULL: nothing */

/* Image `index` as a PNG file's bytes, as `ldmrt generate` writes them; owned by the result. */
LDMRT_API ldmrt_status ldmrt_result_png(const ldmrt_result *result, int32_t index,
                                        const uint8_t **data, size_t *size);
/* Write the images as `ldmrt generate --out PATH` does (.png: PATH or name-0.png, name-1.png for
 * a batch; .npy: one array); replaces only files ldmrt wrote. */
LDMRT_API ldmrt_status ldmrt_result_save(const ldmrt_result *result, const char *path);

/* --- errors ------------------------------------------------------------------------------- */

LDMRT_API const char *ldmrt_last_error(void);        /* "" after a call that succeeded */
LDMRT_API const char *ldmrt_last_error_field(void);  /* the input at fault ("steps", "bundle"), or "" */
LDMRT_API const char *ldmrt_status_name(ldmrt_status status);   /* "LDMRT_ERR_BUNDLE" */

#ifdef __cplusplus
}
#endif

#endif /* LDMRT_H */
