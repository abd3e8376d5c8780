/* generate: one image from a bundle through ldmrt.h, with progress and Ctrl-C to cancel.
 *
 *   generate BUNDLE PROMPT OUT.png [SEED [STEPS [BACKEND]]]
 *
 * Exit status: 0 written, 1 usage, 2 an ldmrt error (its message on stderr), 130 cancelled.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include <ldmrt.h>

static ldmrt_cancel *cancel;

static void on_interrupt(int signal_number) {
    (void)signal_number;
    ldmrt_cancel_trigger(cancel);      /* one atomic store: safe in a signal handler */
}

static int32_t on_step(void *user_data, int32_t done, int32_t total) {
    (void)user_data;
    fprintf(stderr, "\rdenoising %d/%d", done, total);
    if (done == total)
        fputc('\n', stderr);
    return 0;                          /* nonzero would stop the run here */
}

static int failed(const char *what, ldmrt_status status) {
    fprintf(stderr, "%s: %s (%s)\n", what, ldmrt_last_error(), ldmrt_status_name(status));
    return status == LDMRT_ERR_CANCELLED ? 130 : 2;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s BUNDLE PROMPT OUT.png [SEED [STEPS [BACKEND]]]\n", argv[0]);
        return 1;
    }
    ldmrt_open_options options;
    ldmrt_open_options_init(&options);
    options.backend = argc > 6 ? argv[6] : NULL;
    ldmrt_pipeline *pipeline;
    ldmrt_status status = ldmrt_open(argv[1], &options, &pipeline);
    if (status != LDMRT_OK)
        return failed("open", status);

    ldmrt_request request;
    ldmrt_request_init(&request);
    request.prompt = argv[2];
    request.seed = argc > 4 ? strtoll(argv[4], NULL, 10) : 0;
    request.steps = argc > 5 ? atoi(argv[5]) : request.steps;

    ldmrt_cancel_create(&cancel);
    signal(SIGINT, on_interrupt);
    ldmrt_callbacks callbacks;
    ldmrt_callbacks_init(&callbacks);
    callbacks.on_step = on_step;
    callbacks.cancel = cancel;

    ldmrt_result *result;
    status = ldmrt_generate(pipeline, &request, &callbacks, &result);
    int exit_code = 0;
    if (status != LDMRT_OK)
        exit_code = failed("generate", status);
    else {
        if (result->warnings[0] != '\0')
            fprintf(stderr, "warning: %s\n", result->warnings);
        status = ldmrt_result_save(result, argv[3]);
        if (status != LDMRT_OK)
            exit_code = failed("save", status);
        else
            printf("wrote %s (%dx%d, timings %s)\n", argv[3], result->width, result->height,
                   result->timings_json);
        ldmrt_result_free(result);
    }
    ldmrt_cancel_destroy(cancel);
    ldmrt_close(pipeline);
    return exit_code;
}
