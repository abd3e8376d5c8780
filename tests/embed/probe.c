/* probe: what tests/test_embed.py asks of libldmrt from C, one mode per run.
 *
 *   probe threads BUNDLE THREADS REQUESTS   several threads on one pipeline == the sequential results
 *   probe cancel BUNDLE                     cancel from another thread mid-run; the pipeline still works
 *   probe open BUNDLE [BACKEND [OPTIONS]]   prints the status line of ldmrt_open
 *   probe request BUNDLE FIELD VALUE        one request field set (see set_field); prints the status line
 *   probe init VENV                         ldmrt_init with that venv; prints the status line
 *   probe abi BUNDLE                        struct sizes this library does not know are refused
 *   probe soak BUNDLE COUNT                 COUNT generations, "rss DONE KIB SECONDS" every 10
 *   probe forget BUNDLE                     one result never freed: the leak checker must see it
 *
 * A status line: "status=NAME field=FIELD message=MESSAGE". Exit 0 unless a check failed (1).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <ldmrt.h>

#define CHECK(condition, ...) do { if (!(condition)) { fprintf(stderr, "FAILED: " __VA_ARGS__); \
    fprintf(stderr, " (%s:%d; last error: %s)\n", __FILE__, __LINE__, ldmrt_last_error()); exit(1); } } while (0)

static void print_status(ldmrt_status status) {
    printf("status=%s field=%s message=%s\n", ldmrt_status_name(status), ldmrt_last_error_field(),
           ldmrt_last_error());
}

static ldmrt_pipeline *open_bundle(const char *bundle) {
    ldmrt_pipeline *pipeline = NULL;
    ldmrt_status status = ldmrt_open(bundle, NULL, &pipeline);
    CHECK(status == LDMRT_OK, "ldmrt_open(%s) = %s", bundle, ldmrt_status_name(status));
    return pipeline;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static ldmrt_result *generate_seed(ldmrt_pipeline *pipeline, int64_t seed, int32_t steps) {
    ldmrt_request request;
    ldmrt_request_init(&request);
    request.prompt = seed % 2 ? "a blue 3 on a yellow background" : "a red 7 on a white background";
    request.seed = seed;
    request.steps = steps;
    ldmrt_result *result = NULL;
    ldmrt_status status = ldmrt_generate(pipeline, &request, NULL, &result);
    CHECK(status == LDMRT_OK && result != NULL, "generate seed %lld = %s", (long long)seed, ldmrt_status_name(status));
    return result;
}

static int same(const ldmrt_result *a, const ldmrt_result *b) {
    size_t n = (size_t)a->batch * a->height * a->width * a->channels;
    return a->batch == b->batch && a->height == b->height && a->width == b->width && a->channels == b->channels
        && memcmp(a->pixels, b->pixels, n) == 0 && memcmp(a->images, b->images, n * sizeof(float)) == 0;
}

/* --- threads ------------------------------------------------------------------------------ */

typedef struct worker {
    ldmrt_pipeline *pipeline;
    int first, count;
    ldmrt_result **results;
} worker;

static void *work(void *argument) {
    worker *w = argument;
    for (int i = 0; i < w->count; i++)
        w->results[w->first + i] = generate_seed(w->pipeline, w->first + i, 10);
    return NULL;
}

static int threads(const char *bundle, int thread_count, int requests) {
    ldmrt_pipeline *pipeline = open_bundle(bundle);
    int total = thread_count * requests;
    ldmrt_result **alone = calloc(total, sizeof *alone), **together = calloc(total, sizeof *together);
    double start = now();
    for (int i = 0; i < total; i++)
        alone[i] = generate_seed(pipeline, i, 10);
    double sequential = now() - start;
    pthread_t *ids = calloc(thread_count, sizeof *ids);
    worker *workers = calloc(thread_count, sizeof *workers);
    start = now();
    for (int t = 0; t < thread_count; t++) {
        workers[t] = (worker){pipeline, t * requests, requests, together};
        CHECK(pthread_create(&ids[t], NULL, work, &workers[t]) == 0, "pthread_create");
    }
    for (int t = 0; t < thread_count; t++)
        pthread_join(ids[t], NULL);
    double threaded = now() - start;
    int differing = 0, distinct = 0;
    for (int i = 0; i < total; i++) {
        differing += !same(alone[i], together[i]);
        distinct += i > 0 && !same(alone[i], alone[i - 1]);
    }
    printf("threads %d x %d: %d differ from the sequential results; %d of %d neighbours distinct; "
           "sequential %.3f s, threaded %.3f s\n", thread_count, requests, differing, distinct, total - 1,
           sequential, threaded);
    CHECK(differing == 0, "%d threaded results differ", differing);
    CHECK(distinct == total - 1, "seeds gave equal images: the comparison proves nothing");
    for (int i = 0; i < total; i++) {
        ldmrt_result_free(alone[i]);
        ldmrt_result_free(together[i]);
    }
    free(alone), free(together), free(ids), free(workers);
    ldmrt_close(pipeline);
    return 0;
}

/* --- cancel ------------------------------------------------------------------------------- */

typedef struct progress {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int done, total;
} progress;

static int32_t on_step(void *user_data, int32_t done, int32_t total) {
    progress *p = user_data;
    pthread_mutex_lock(&p->lock);
    p->done = done, p->total = total;
    pthread_cond_signal(&p->changed);
    pthread_mutex_unlock(&p->lock);
    nanosleep(&(struct timespec){0, 20000000}, NULL);   /* slow steps: the other thread's cancel lands mid-run */
    return 0;
}

static int32_t stop_at_five(void *user_data, int32_t done, int32_t total) {
    (void)total;
    *(int32_t *)user_data = done;
    return done >= 5;
}

typedef struct cancel_run {
    ldmrt_pipeline *pipeline;
    ldmrt_callbacks *callbacks;
    ldmrt_status status;
    ldmrt_result *result;
    char message[512];
} cancel_run;

static void *run_cancellable(void *argument) {
    cancel_run *run = argument;
    ldmrt_request request;
    ldmrt_request_init(&request);
    request.prompt = "a red 7 on a white background";
    request.steps = 50;
    run->status = ldmrt_generate(run->pipeline, &request, run->callbacks, &run->result);
    snprintf(run->message, sizeof run->message, "%s", ldmrt_last_error());
    return NULL;
}

static int cancel(const char *bundle) {
    ldmrt_pipeline *pipeline = open_bundle(bundle);
    progress p = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    ldmrt_cancel *token;
    CHECK(ldmrt_cancel_create(&token) == LDMRT_OK, "cancel_create");
    ldmrt_callbacks callbacks;
    ldmrt_callbacks_init(&callbacks);
    callbacks.on_step = on_step, callbacks.user_data = &p, callbacks.cancel = token;
    cancel_run run = {pipeline, &callbacks, LDMRT_OK, NULL, ""};
    pthread_t id;
    CHECK(pthread_create(&id, NULL, run_cancellable, &run) == 0, "pthread_create");
    pthread_mutex_lock(&p.lock);
    while (p.done < 3)
        pthread_cond_wait(&p.changed, &p.lock);
    pthread_mutex_unlock(&p.lock);
    ldmrt_cancel_trigger(token);            /* from this thread, while the other one denoises */
    pthread_join(id, NULL);
    printf("cancelled at step %d of %d: %s: %s\n", p.done, p.total, ldmrt_status_name(run.status), run.message);
    CHECK(run.status == LDMRT_ERR_CANCELLED && run.result == NULL, "expected LDMRT_ERR_CANCELLED");
    CHECK(p.done < p.total, "the run finished before the cancel");
    /* a triggered token stops the next call before any model runs; reset, it runs through */
    p.done = 0;
    run.status = LDMRT_OK;
    run_cancellable(&run);
    CHECK(run.status == LDMRT_ERR_CANCELLED && p.done == 0, "a triggered token must stop before step 1");
    ldmrt_cancel_reset(token);
    run_cancellable(&run);
    CHECK(run.status == LDMRT_OK && p.done == 50, "after reset the pipeline runs every step");
    ldmrt_result *again = run.result;
    callbacks.on_step = NULL;
    run_cancellable(&run);
    CHECK(run.status == LDMRT_OK && same(again, run.result), "a cancelled run left state behind");
    printf("after the cancel: the same pipeline generates, identical results\n");
    ldmrt_result_free(again);
    ldmrt_result_free(run.result);
    /* a progress callback that returns nonzero stops the call right there */
    int32_t reached = 0;
    ldmrt_callbacks stopping;
    ldmrt_callbacks_init(&stopping);
    stopping.on_step = stop_at_five, stopping.user_data = &reached;
    run.callbacks = &stopping;
    run_cancellable(&run);
    CHECK(run.status == LDMRT_ERR_CANCELLED && reached == 5 && run.result == NULL, "on_step's nonzero return");
    printf("on_step returning nonzero stopped at step %d\n", reached);
    ldmrt_cancel_destroy(token);
    ldmrt_close(pipeline);
    return 0;
}

/* --- errors ------------------------------------------------------------------------------- */

static int open_only(const char *bundle, const char *backend, const char *options_json) {
    ldmrt_open_options options;
    ldmrt_open_options_init(&options);
    options.backend = backend;
    options.backend_options = options_json;
    ldmrt_pipeline *pipeline = NULL;
    ldmrt_status status = ldmrt_open(bundle, &options, &pipeline);
    print_status(status);
    CHECK((status == LDMRT_OK) == (pipeline != NULL), "pipeline set iff LDMRT_OK");
    ldmrt_close(pipeline);
    return 0;
}

static float nan_pixels[2 * 32 * 32 * 3];

/* One field of a default request set from text; unknown FIELD: exit 1. */
static void set_field(ldmrt_request *r, const char *field, const char *value) {
    static const char *bad_utf8 = "\xff\xfe not UTF-8";
    static const char *prompts[2];
    if (strcmp(field, "steps") == 0) r->steps = atoi(value);
    else if (strcmp(field, "guidance") == 0) r->guidance = strtod(value, NULL);
    else if (strcmp(field, "seed") == 0) r->seed = strtoll(value, NULL, 10);
    else if (strcmp(field, "height") == 0) r->height = atoi(value);
    else if (strcmp(field, "batch") == 0) r->batch = atoi(value);
    else if (strcmp(field, "sampler") == 0) r->sampler = value;
    else if (strcmp(field, "tile") == 0) r->tile = atoi(value);
    else if (strcmp(field, "prompt") == 0) r->prompt = strcmp(value, "bad-utf8") == 0 ? bad_utf8 : value;
    else if (strcmp(field, "prompts") == 0) {            /* VALUE: how many, the second one NULL */
        prompts[0] = "a red 7 on a white background", prompts[1] = NULL;
        r->prompts = prompts, r->num_prompts = atoi(value);
    } else if (strcmp(field, "struct_size") == 0) r->struct_size = (uint32_t)atoi(value);
    else if (strcmp(field, "latents_ndim") == 0) {
        r->latents = (ldmrt_tensor){nan_pixels, LDMRT_DTYPE_FLOAT32, atoi(value), {1, 3, 16, 16}};
    } else if (strcmp(field, "latents_shape") == 0) {    /* VALUE: the channel count */
        r->latents = (ldmrt_tensor){nan_pixels, LDMRT_DTYPE_FLOAT32, 4, {1, atoi(value), 8, 8}};
    } else if (strcmp(field, "init_image_dtype") == 0) {
        r->init_image = (ldmrt_tensor){nan_pixels, atoi(value), 4, {1, 32, 32, 3}};
    } else if (strcmp(field, "init_image_nan") == 0) {
        for (size_t i = 0; i < sizeof nan_pixels / sizeof *nan_pixels; i++)
            nan_pixels[i] = i % 7 ? 0.5f : strtof("nan", NULL);
        r->init_image = (ldmrt_tensor){nan_pixels, LDMRT_DTYPE_FLOAT32, 4, {1, 32, 32, 3}};
    } else if (strcmp(field, "layout_json") == 0) r->layout_json = value;
    else if (strcmp(field, "class_labels") == 0) r->num_class_labels = atoi(value);   /* labels NULL */
    else {
        fprintf(stderr, "probe: unknown field %s\n", field);
        exit(1);
    }
}

static int request_field(const char *bundle, const char *field, const char *value) {
    ldmrt_pipeline *pipeline = open_bundle(bundle);
    ldmrt_request request;
    ldmrt_request_init(&request);
    set_field(&request, field, value);
    ldmrt_result *result = (ldmrt_result *)&request;     /* must come back NULL on failure */
    ldmrt_status status = ldmrt_generate(pipeline, &request, NULL, &result);
    print_status(status);
    CHECK((status == LDMRT_OK) == (result != NULL), "result set iff LDMRT_OK");
    ldmrt_result_free(result);
    ldmrt_close(pipeline);
    return 0;
}

static int init_venv(const char *venv) {
    ldmrt_init_options options;
    ldmrt_init_options_init(&options);
    options.venv = venv;
    ldmrt_status status = ldmrt_init(&options);
    print_status(status);
    ldmrt_status again = ldmrt_init(NULL);       /* once per process: the first outcome stays */
    CHECK(again == status && (status == LDMRT_OK || ldmrt_last_error()[0] != '\0'), "a second init differs");
    ldmrt_pipeline *pipeline = NULL;
    CHECK(ldmrt_open("/nonexistent", NULL, &pipeline) == (status == LDMRT_OK ? LDMRT_ERR_BUNDLE : status),
          "open after init");
    return 0;
}

static int abi(const char *bundle) {
    CHECK(ldmrt_abi_version() == LDMRT_ABI_VERSION, "ABI %d, header %d", ldmrt_abi_version(), LDMRT_ABI_VERSION);
    ldmrt_pipeline *pipeline = open_bundle(bundle);
    ldmrt_request request;
    ldmrt_request_init(&request);
    ldmrt_result *result = NULL;
    request.struct_size = sizeof request + 8;            /* a newer header than the library */
    CHECK(ldmrt_generate(pipeline, &request, NULL, &result) == LDMRT_ERR_ABI && result == NULL, "larger struct");
    print_status(LDMRT_ERR_ABI);
    ldmrt_callbacks callbacks;
    ldmrt_callbacks_init(&callbacks);
    callbacks.struct_size = 4;
    request.struct_size = sizeof request;
    CHECK(ldmrt_generate(pipeline, &request, &callbacks, &result) == LDMRT_ERR_ABI, "short callbacks");
    print_status(LDMRT_ERR_ABI);
    CHECK(ldmrt_generate(NULL, &request, NULL, &result) == LDMRT_ERR_INVALID_ARGUMENT
          && strcmp(ldmrt_last_error_field(), "pipeline") == 0, "NULL pipeline");
    CHECK(ldmrt_generate(pipeline, NULL, NULL, &result) == LDMRT_ERR_INVALID_ARGUMENT, "NULL request");
    CHECK(ldmrt_generate(pipeline, &request, NULL, NULL) == LDMRT_ERR_INVALID_ARGUMENT, "NULL result");
    ldmrt_pipeline *other = pipeline;
    CHECK(ldmrt_open(NULL, NULL, &other) == LDMRT_ERR_INVALID_ARGUMENT && other == NULL, "NULL bundle");
    CHECK(ldmrt_result_png(NULL, 0, NULL, NULL) == LDMRT_ERR_INVALID_ARGUMENT, "NULL png result");
    CHECK(ldmrt_generate(pipeline, &request, NULL, &result) == LDMRT_OK, "generate");
    const uint8_t *png;
    size_t size;
    CHECK(ldmrt_result_png(result, 1, &png, &size) == LDMRT_ERR_INVALID_ARGUMENT
          && strcmp(ldmrt_last_error_field(), "index") == 0, "index out of range");
    CHECK(ldmrt_result_png(result, 0, &png, &size) == LDMRT_OK && size > 8 && memcmp(png, "\x89PNG", 4) == 0,
          "png bytes");
    CHECK(strcmp(ldmrt_last_error(), "") == 0, "a success clears the last error");
    ldmrt_result_free(result);
    ldmrt_close(pipeline);
    printf("abi ok\n");
    return 0;
}

/* --- soak --------------------------------------------------------------------------------- */

static long rss_kib(void) {
    long pages = 0, resident = 0;
    FILE *file = fopen("/proc/self/statm", "r");
    if (file != NULL) {
        if (fscanf(file, "%ld %ld", &pages, &resident) != 2)
            resident = 0;
        fclose(file);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static int soak(const char *bundle, int count) {
    ldmrt_pipeline *pipeline = open_bundle(bundle);
    double start = now();
    for (int i = 1; i <= count; i++) {
        ldmrt_result *result = generate_seed(pipeline, i, 10);
        const uint8_t *png;
        size_t size;
        CHECK(ldmrt_result_png(result, 0, &png, &size) == LDMRT_OK, "png");
        ldmrt_result_free(result);
        if (i % 10 == 0 || i == 1)
            printf("rss %d %ld %.3f\n", i, rss_kib(), now() - start);
    }
    ldmrt_close(pipeline);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "threads") == 0 && argc == 5) return threads(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (strcmp(mode, "cancel") == 0 && argc == 3) return cancel(argv[2]);
    if (strcmp(mode, "open") == 0 && argc >= 3)
        return open_only(argv[2], argc > 3 ? argv[3] : NULL, argc > 4 ? argv[4] : NULL);
    if (strcmp(mode, "request") == 0 && argc == 5) return request_field(argv[2], argv[3], argv[4]);
    if (strcmp(mode, "init") == 0 && argc == 3) return init_venv(argv[2]);
    if (strcmp(mode, "abi") == 0 && argc == 3) return abi(argv[2]);
    if (strcmp(mode, "soak") == 0 && argc == 4) return soak(argv[2], atoi(argv[3]));
    if (strcmp(mode, "forget") == 0 && argc == 3) {
        ldmrt_pipeline *pipeline = open_bundle(argv[2]);
        ldmrt_result *leaked = generate_seed(pipeline, 1, 2);
        printf("forgot a %dx%d result\n", leaked->width, leaked->height);
        leaked = NULL;
        ldmrt_close(pipeline);
        return 0;
    }
    fprintf(stderr, "usage: see the top of probe.c\n");
    return 1;
}
