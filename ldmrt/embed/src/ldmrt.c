/* Pipelines, generation, results and cancel tokens: each call takes the GIL for its Python part. */
#include "internal.h"     /* Python.h first */

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct ldmrt_pipeline {
    PyObject *pipeline;           /* ldmrt.runtime.pipeline.Pipeline */
};

struct ldmrt_cancel {
    atomic_int triggered;
};

typedef struct result_impl {
    ldmrt_result result;          /* first: the caller's pointer is this */
    uint8_t *pixels;
    float *images;
    float *latents;
    char *warnings;
    char *timings_json;
    pthread_mutex_t png_lock;     /* ldmrt_result_png fills png[] once per image */
    PyObject **png;               /* bytes per image; taken and dropped with the GIL */
} result_impl;

static ldmrt_status missing(const char *name) {
    return ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, name, "%s: NULL; expected a pointer", name);
}

/* --- pipelines ---------------------------------------------------------------------------- */

void ldmrt_open_options_init(ldmrt_open_options *options) {
    if (options == NULL)
        return;
    memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->verify = 1;
}

ldmrt_status ldmrt_open(const char *bundle, const ldmrt_open_options *caller, ldmrt_pipeline **out) {
    ldmrt_clear_error();
    if (out == NULL)
        return missing("pipeline");
    *out = NULL;
    if (bundle == NULL)
        return missing("bundle");
    ldmrt_open_options options;
    ldmrt_open_options_init(&options);
    ldmrt_status status = caller == NULL ? LDMRT_OK
        : ldmrt_copy_struct(&options, sizeof options, sizeof options, caller, "ldmrt_open_options");
    PyGILState_STATE gil;
    if (status != LDMRT_OK || (status = ldmrt_enter(&gil)) != LDMRT_OK)
        return status;
    PyObject *pipeline = ldmrt_call_host("open", Py_BuildValue(
        "(yziOdz)", bundle, options.backend, options.verify, Py_None, options.max_cost, options.backend_options));
    ldmrt_pipeline *handle = NULL;
    if (pipeline == NULL)
        status = ldmrt_fail_from_python();
    else if ((handle = malloc(sizeof *handle)) == NULL) {
        Py_DECREF(pipeline);
        status = ldmrt_fail(LDMRT_ERR_OUT_OF_MEMORY, NULL, "out of memory");
    } else {
        handle->pipeline = pipeline;
        *out = handle;
    }
    PyGILState_Release(gil);
    return status;
}

void ldmrt_close(ldmrt_pipeline *pipeline) {
    if (pipeline == NULL)
        return;
    PyGILState_STATE gil;
    if (ldmrt_enter(&gil) == LDMRT_OK) {     /* a pipeline exists only after ldmrt_init succeeded */
        Py_DECREF(pipeline->pipeline);
        PyGILState_Release(gil);
    }
    free(pipeline);
}

ldmrt_status ldmrt_set_loras(ldmrt_pipeline *pipeline, const char *const *adapters, int32_t count) {
    ldmrt_clear_error();
    if (pipeline == NULL)
        return missing("pipeline");
    if (count < 0 || (count > 0 && adapters == NULL))
        return ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, "adapters", "adapters: expected an array of count >= 0 "
                          "strings, found %s with count %d", adapters ? "an array" : "NULL", count);
    PyGILState_STATE gil;
    ldmrt_status status = ldmrt_enter(&gil);
    if (status != LDMRT_OK)
        return status;
    PyObject *list = PyList_New(0);
    for (int32_t i = 0; list != NULL && i < count; i++) {
        PyObject *text = adapters[i] != NULL ? PyUnicode_DecodeFSDefault(adapters[i]) : NULL;
        if (text == NULL || PyList_Append(list, text) != 0) {
            Py_XDECREF(text);
            Py_CLEAR(list);
            if (!PyErr_Occurred())
                status = ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, "adapters", "adapters[%d]: NULL; expected "
                                    "\"FILE\" or \"FILE:SCALE\"", i);
            break;
        }
        Py_DECREF(text);
    }
    PyObject *done = list != NULL ? ldmrt_call_host("set_loras", Py_BuildValue("(ON)", pipeline->pipeline, list))
                                  : NULL;
    if (done == NULL && status == LDMRT_OK)
        status = ldmrt_fail_from_python();
    Py_XDECREF(done);
    PyGILState_Release(gil);
    return status;
}

/* --- cancel tokens ------------------------------------------------------------------------ */

ldmrt_status ldmrt_cancel_create(ldmrt_cancel **cancel) {
    ldmrt_clear_error();
    if (cancel == NULL)
        return missing("cancel");
    *cancel = malloc(sizeof **cancel);
    if (*cancel == NULL)
        return ldmrt_fail(LDMRT_ERR_OUT_OF_MEMORY, NULL, "out of memory");
    atomic_init(&(*cancel)->triggered, 0);
    return LDMRT_OK;
}

void ldmrt_cancel_trigger(ldmrt_cancel *cancel) {
    if (cancel != NULL)
        atomic_store(&cancel->triggered, 1);
}

void ldmrt_cancel_reset(ldmrt_cancel *cancel) {
    if (cancel != NULL)
        atomic_store(&cancel->triggered, 0);
}

int32_t ldmrt_cancel_triggered(const ldmrt_cancel *cancel) {
    return cancel != NULL && atomic_load(&((ldmrt_cancel *)cancel)->triggered);
}

void ldmrt_cancel_destroy(ldmrt_cancel *cancel) { free(cancel); }

void ldmrt_callbacks_init(ldmrt_callbacks *callbacks) {
    if (callbacks == NULL)
        return;
    memset(callbacks, 0, sizeof *callbacks);
    callbacks->struct_size = sizeof *callbacks;
}

/* --- the callables the pipeline calls back: self is a capsule holding the call's context ----- */

typedef struct call_context {
    ldmrt_callbacks callbacks;
    int stop;                     /* on_step returned nonzero (read and written on the generating thread) */
} call_context;

static const char *CONTEXT = "ldmrt.call_context";

static PyObject *on_step(PyObject *self, PyObject *args) {
    call_context *context = PyCapsule_GetPointer(self, CONTEXT);
    int done, total;
    if (context == NULL || !PyArg_ParseTuple(args, "ii", &done, &total))
        return NULL;
    int32_t stop;
    Py_BEGIN_ALLOW_THREADS     /* the caller's code may take its time, or call ldmrt */
    stop = context->callbacks.on_step(context->callbacks.user_data, done, total);
    Py_END_ALLOW_THREADS
    context->stop = context->stop || stop != 0;
    Py_RETURN_NONE;
}

static PyObject *cancelled(PyObject *self, PyObject *unused) {
    (void)unused;
    call_context *context = PyCapsule_GetPointer(self, CONTEXT);
    if (context == NULL)
        return NULL;
    return PyBool_FromLong(context->stop || ldmrt_cancel_triggered(context->callbacks.cancel));
}

static PyMethodDef on_step_method = {"on_step", on_step, METH_VARARGS, "progress to the C caller"};
static PyMethodDef cancelled_method = {"cancel", cancelled, METH_NOARGS, "the C caller's cancel token"};

static PyObject *callable(PyMethodDef *method, call_context *context, int wanted) {
    if (!wanted)
        Py_RETURN_NONE;
    PyObject *capsule = PyCapsule_New(context, CONTEXT, NULL);
    if (capsule == NULL)
        return NULL;
    PyObject *function = PyCFunction_New(method, capsule);
    Py_DECREF(capsule);
    return function;
}

/* --- generation --------------------------------------------------------------------------- */

static void free_result(result_impl *impl) {
    free(impl->pixels);
    free(impl->images);
    free(impl->latents);
    free(impl->warnings);
    free(impl->timings_json);
    if (impl->png != NULL) {
        PyGILState_STATE gil;
        if (ldmrt_enter(&gil) == LDMRT_OK) {
            for (int32_t i = 0; i < impl->result.batch; i++)
                Py_XDECREF(impl->png[i]);
            PyGILState_Release(gil);
        }
        free(impl->png);
    }
    pthread_mutex_destroy(&impl->png_lock);
    free(impl);
}

static void *copy_bytes(PyObject *bytes) {
    if (bytes == Py_None || PyBytes_GET_SIZE(bytes) == 0)
        return calloc(1, 1);
    void *copy = malloc((size_t)PyBytes_GET_SIZE(bytes));
    if (copy != NULL)
        memcpy(copy, PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
    return copy;
}

/* host.generate's answer (pixels, images, (B, H, W, C), latents, latent shape, warnings, timings)
 * -> a result in C memory. */
static ldmrt_status to_result(PyObject *answer, ldmrt_result **out) {
    PyObject *pixels, *images, *latents, *latent_shape;
    int32_t batch, height, width, channels;
    const char *warnings, *timings;
    if (!PyArg_ParseTuple(answer, "OO(iiii)SO!ss", &pixels, &images, &batch, &height, &width, &channels,
                          &latents, &PyTuple_Type, &latent_shape, &warnings, &timings))
        return ldmrt_fail_from_python();
    result_impl *impl = calloc(1, sizeof *impl);
    if (impl == NULL)
        return ldmrt_fail(LDMRT_ERR_OUT_OF_MEMORY, NULL, "out of memory");
    pthread_mutex_init(&impl->png_lock, NULL);
    ldmrt_result *r = &impl->result;
    r->struct_size = sizeof *r;
    r->batch = batch, r->height = height, r->width = width, r->channels = channels;
    r->latent_ndim = (int32_t)PyTuple_GET_SIZE(latent_shape);
    for (int32_t i = 0; i < r->latent_ndim && i < LDMRT_MAX_NDIM; i++)
        r->latent_shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(latent_shape, i));
    impl->pixels = copy_bytes(pixels);
    impl->images = copy_bytes(images);
    impl->latents = copy_bytes(latents);
    impl->warnings = strdup(warnings);
    impl->timings_json = strdup(timings);
    impl->png = batch > 0 ? calloc((size_t)batch, sizeof *impl->png) : NULL;
    if (!impl->pixels || !impl->images || !impl->latents || !impl->warnings || !impl->timings_json
        || (batch > 0 && !impl->png)) {
        free_result(impl);
        return ldmrt_fail(LDMRT_ERR_OUT_OF_MEMORY, NULL, "out of memory");
    }
    r->pixels = impl->pixels, r->images = impl->images, r->latents = impl->latents;
    r->warnings = impl->warnings, r->timings_json = impl->timings_json;
    *out = r;
    return LDMRT_OK;
}

ldmrt_status ldmrt_generate(ldmrt_pipeline *pipeline, const ldmrt_request *request,
                            const ldmrt_callbacks *caller, ldmrt_result **out) {
    ldmrt_clear_error();
    if (out == NULL)
        return missing("result");
    *out = NULL;
    if (pipeline == NULL)
        return missing("pipeline");
    if (request == NULL)
        return missing("request");
    call_context context = {.stop = 0};     /* lives through the call: the capsules point at it */
    ldmrt_callbacks_init(&context.callbacks);
    ldmrt_status status = caller == NULL ? LDMRT_OK
        : ldmrt_copy_struct(&context.callbacks, sizeof context.callbacks, sizeof context.callbacks, caller,
                            "ldmrt_callbacks");
    const ldmrt_callbacks *callbacks = &context.callbacks;
    PyGILState_STATE gil;
    if (status != LDMRT_OK || (status = ldmrt_enter(&gil)) != LDMRT_OK)
        return status;
    PyObject *fields = NULL, *step = NULL, *cancel = NULL, *answer = NULL;
    status = ldmrt_request_fields(request, &fields);
    if (status == LDMRT_OK) {
        step = callable(&on_step_method, &context, callbacks->on_step != NULL);
        cancel = step ? callable(&cancelled_method, &context, callbacks->cancel != NULL || callbacks->on_step != NULL)
                      : NULL;
        answer = cancel ? ldmrt_call_host("generate", Py_BuildValue("(OOOO)", pipeline->pipeline, fields, step,
                                                                    cancel)) : NULL;
        status = answer != NULL ? to_result(answer, out) : ldmrt_fail_from_python();
    }
    Py_XDECREF(answer);
    Py_XDECREF(cancel);
    Py_XDECREF(step);
    Py_XDECREF(fields);
    PyGILState_Release(gil);
    return status;
}

void ldmrt_result_free(ldmrt_result *result) {
    if (result != NULL)
        free_result((result_impl *)result);
}

/* --- results as files --------------------------------------------------------------------- */

static ldmrt_status check_images(const ldmrt_result *result) {
    if (result == NULL)
        return missing("result");
    if (result->batch == 0)
        return ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, "result", "result: holds latents only (denoising_end), "
                          "no images");
    return LDMRT_OK;
}

ldmrt_status ldmrt_result_png(const ldmrt_result *result, int32_t index, const uint8_t **data, size_t *size) {
    ldmrt_clear_error();
    ldmrt_status status = check_images(result);
    if (status != LDMRT_OK)
        return status;
    if (data == NULL || size == NULL)
        return missing(data == NULL ? "data" : "size");
    if (index < 0 || index >= result->batch)
        return ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, "index", "index %d: expected 0..%d (the result's batch "
                          "%d)", index, result->batch - 1, result->batch);
    result_impl *impl = (result_impl *)result;
    pthread_mutex_lock(&impl->png_lock);
    PyObject *png = impl->png[index];
    pthread_mutex_unlock(&impl->png_lock);
    if (png == NULL) {
        PyGILState_STATE gil;
        if ((status = ldmrt_enter(&gil)) != LDMRT_OK)
            return status;
        size_t image_bytes = (size_t)result->height * result->width * result->channels;
        png = ldmrt_call_host("png", Py_BuildValue("(y#iii)", (const char *)result->pixels + image_bytes * index,
                                                   (Py_ssize_t)image_bytes, result->height, result->width,
                                                   result->channels));
        if (png == NULL || !PyBytes_Check(png)) {
            Py_XDECREF(png);
            status = PyErr_Occurred() ? ldmrt_fail_from_python()
                                      : ldmrt_fail(LDMRT_ERR_INTERNAL, NULL, "host.png returned no bytes");
            PyGILState_Release(gil);
            return status;
        }
        pthread_mutex_lock(&impl->png_lock);
        if (impl->png[index] == NULL)
            impl->png[index] = png;        /* the result owns it */
        else {
            Py_DECREF(png);                /* another thread was first */
            png = impl->png[index];
        }
        pthread_mutex_unlock(&impl->png_lock);
        PyGILState_Release(gil);
    }
    *data = (const uint8_t *)PyBytes_AS_STRING(png);
    *size = (size_t)PyBytes_GET_SIZE(png);
    return LDMRT_OK;
}

ldmrt_status ldmrt_result_save(const ldmrt_result *result, const char *path) {
    ldmrt_clear_error();
    ldmrt_status status = check_images(result);
    if (status != LDMRT_OK)
        return status;
    if (path == NULL)
        return missing("path");
    PyGILState_STATE gil;
    if ((status = ldmrt_enter(&gil)) != LDMRT_OK)
        return status;
    size_t count = (size_t)result->batch * result->height * result->width * result->channels;
    PyObject *written = ldmrt_call_host("save", Py_BuildValue(
        "(y#(iiii)y)", (const char *)result->images, (Py_ssize_t)(count * sizeof(float)), result->batch,
        result->height, result->width, result->channels, path));
    if (written == NULL)
        status = ldmrt_fail_from_python();
    Py_XDECREF(written);
    PyGILState_Release(gil);
    return status;
}
