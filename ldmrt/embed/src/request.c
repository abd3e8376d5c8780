/* A caller's ldmrt_request -> the keyword dict ldmrt.embed.host.generate takes. */
#include "internal.h"     /* Python.h first */

#include <math.h>
#include <string.h>

ldmrt_status ldmrt_copy_struct(void *full, size_t full_size, size_t first_size, const void *caller,
                               const char *name) {
    uint32_t size;
    memcpy(&size, caller, sizeof size);      /* every struct starts with its struct_size */
    if (size < first_size || size > full_size)
        return ldmrt_fail(LDMRT_ERR_ABI, "struct_size", "%s.struct_size %u: expected %zu..%zu (this libldmrt, "
                          "ABI %d); set it with the struct's _init function, and build against this "
                          "library's ldmrt.h", name, size, first_size, full_size, LDMRT_ABI_VERSION);
    memcpy(full, caller, size);
    return LDMRT_OK;
}

void ldmrt_request_init(ldmrt_request *request) {
    if (request == NULL)
        return;
    memset(request, 0, sizeof *request);
    request->struct_size = sizeof *request;
    request->steps = 20;
    request->guidance = 7.5;
    request->batch = 1;
    request->strength = NAN;
    request->noise_level = -1;
    request->tile = LDMRT_TILE_AUTO;
    request->guide_scale = NAN;
    request->guide_uncertainty = NAN;
    request->aesthetic_score = NAN;
    request->negative_aesthetic_score = NAN;
    request->denoising_end = NAN;
    request->denoising_start = NAN;
}

/* dict[name] = value (stolen); 0 on failure with the Python error pending. */
static int put(PyObject *fields, const char *name, PyObject *value) {
    if (value == NULL)
        return 0;
    int failed = PyDict_SetItemString(fields, name, value);
    Py_DECREF(value);
    return failed == 0;
}

/* A caller's string as str; NULL with the error recorded (naming `name`) when it is not UTF-8. */
static PyObject *utf8(const char *name, const char *text) {
    PyObject *decoded = PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "strict");
    if (decoded == NULL) {
        PyErr_Clear();
        ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, name, "%s: not valid UTF-8; expected a UTF-8 string", name);
    }
    return decoded;
}

static int put_text(PyObject *fields, const char *name, const char *text) {
    if (text == NULL)
        return 1;
    PyObject *decoded = utf8(name, text);
    return decoded == NULL ? -1 : put(fields, name, decoded);
}

static int put_texts(PyObject *fields, const char *name, const char *const *texts, int32_t count) {
    if (count == 0)
        return 1;
    if (count < 0 || texts == NULL) {
        ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, name, "%s: expected an array of num_%s > 0 strings, found "
                   "%s with num_%s %d", name, name, texts ? "an array" : "NULL", name, count);
        return -1;
    }
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return 0;
    for (int32_t i = 0; i < count; i++) {
        if (texts[i] == NULL) {
            Py_DECREF(list);
            ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, name, "%s[%d]: NULL; expected a UTF-8 string", name, i);
            return -1;
        }
        PyObject *text = utf8(name, texts[i]);
        if (text == NULL) {
            Py_DECREF(list);
            return -1;
        }
        PyList_SET_ITEM(list, i, text);
    }
    return put(fields, name, list);
}

/* A field whose default is "unset" (strength, guide_scale, ...): NaN leaves it to the pipeline. */
static int put_number(PyObject *fields, const char *name, double value) {
    return isnan(value) || put(fields, name, PyFloat_FromDouble(value));   /* NaN: the default */
}

static int put_pair(PyObject *fields, const char *name, const int32_t pair[2], int unset_is_zero) {
    if (unset_is_zero && pair[0] == 0 && pair[1] == 0)
        return 1;
    return put(fields, name, Py_BuildValue("(ii)", pair[0], pair[1]));
}

static size_t item_size(int32_t dtype) {
    switch (dtype) {
    case LDMRT_DTYPE_FLOAT32: return 4;
    case LDMRT_DTYPE_INT32: return 4;
    case LDMRT_DTYPE_UINT8: return 1;
    }
    return 0;
}

/* (bytes, dtype, shape) for host.generate; the shape is checked here, before a byte is read. */
static int put_tensor(PyObject *fields, const char *name, const ldmrt_tensor *tensor) {
    if (tensor->data == NULL)
        return 1;
    size_t size = item_size(tensor->dtype);
    if (size == 0) {
        ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, name, "%s.dtype %d: expected LDMRT_DTYPE_FLOAT32 (1), "
                   "LDMRT_DTYPE_INT32 (2) or LDMRT_DTYPE_UINT8 (3)", name, tensor->dtype);
        return -1;
    }
    if (tensor->ndim < 1 || tensor->ndim > LDMRT_MAX_NDIM) {
        ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, name, "%s.ndim %d: expected 1..%d", name, tensor->ndim,
                   LDMRT_MAX_NDIM);
        return -1;
    }
    int64_t bytes = (int64_t)size;
    PyObject *shape = PyTuple_New(tensor->ndim);
    if (shape == NULL)
        return 0;
    for (int32_t i = 0; i < tensor->ndim; i++) {
        int64_t extent = tensor->shape[i];
        if (extent < 1 || extent > LDMRT_MAX_TENSOR_BYTES || bytes * extent > LDMRT_MAX_TENSOR_BYTES) {
            Py_DECREF(shape);
            ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, name, "%s.shape[%d] %lld: expected a positive extent, "
                       "and at most %lld bytes in all", name, i, (long long)extent,
                       (long long)LDMRT_MAX_TENSOR_BYTES);
            return -1;
        }
        bytes *= extent;
        PyTuple_SET_ITEM(shape, i, PyLong_FromLongLong(extent));
    }
    PyObject *data = PyBytes_FromStringAndSize(tensor->data, (Py_ssize_t)bytes);
    if (data == NULL) {
        Py_DECREF(shape);
        return 0;
    }
    return put(fields, name, Py_BuildValue("(NiN)", data, tensor->dtype, shape));
}

static int put_labels(PyObject *fields, const int32_t *labels, int32_t count) {
    if (count == 0)
        return 1;
    if (count < 0 || labels == NULL) {
        ldmrt_fail(LDMRT_ERR_INVALID_ARGUMENT, "class_labels", "class_labels: expected an array of "
                   "num_class_labels > 0 ints, found %s with num_class_labels %d", labels ? "an array" : "NULL",
                   count);
        return -1;
    }
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return 0;
    for (int32_t i = 0; i < count; i++)
        PyList_SET_ITEM(list, i, PyLong_FromLong(labels[i]));
    return put(fields, "class_labels", list);
}

ldmrt_status ldmrt_request_fields(const ldmrt_request *caller, PyObject **out) {
    ldmrt_request r;
    ldmrt_request_init(&r);
    ldmrt_status status = ldmrt_copy_struct(&r, sizeof r, sizeof r, caller, "ldmrt_request");
    if (status != LDMRT_OK)
        return status;
    PyObject *fields = PyDict_New();
    if (fields == NULL)
        return ldmrt_fail_from_python();
    /* each step: 1 done, 0 a Python error pending, -1 our own error recorded */
    int ok = put_text(fields, "prompt", r.prompt);
    ok = ok > 0 ? put_texts(fields, "prompts", r.prompts, r.num_prompts) : ok;
    ok = ok > 0 ? put_text(fields, "negative_prompt", r.negative_prompt) : ok;
    ok = ok > 0 ? put_texts(fields, "negative_prompts", r.negative_prompts, r.num_negative_prompts) : ok;
    ok = ok > 0 ? put(fields, "steps", PyLong_FromLong(r.steps)) : ok;
    ok = ok > 0 ? put(fields, "guidance", PyFloat_FromDouble(r.guidance)) : ok;   /* NaN: refused, not unset */
    ok = ok > 0 ? put_text(fields, "sampler", r.sampler) : ok;
    ok = ok > 0 ? put(fields, "eta", PyFloat_FromDouble(r.eta)) : ok;
    ok = ok > 0 ? put(fields, "seed", PyLong_FromLongLong(r.seed)) : ok;
    ok = ok > 0 ? put(fields, "height", PyLong_FromLong(r.height)) : ok;
    ok = ok > 0 ? put(fields, "width", PyLong_FromLong(r.width)) : ok;
    ok = ok > 0 ? put(fields, "batch", PyLong_FromLong(r.batch)) : ok;
    ok = ok > 0 ? put_tensor(fields, "latents", &r.latents) : ok;
    ok = ok > 0 ? put_tensor(fields, "init_image", &r.init_image) : ok;
    ok = ok > 0 ? put_number(fields, "strength", r.strength) : ok;
    ok = ok > 0 ? put_labels(fields, r.class_labels, r.num_class_labels) : ok;
    ok = ok > 0 ? put_tensor(fields, "image", &r.image) : ok;
    ok = ok > 0 ? put_tensor(fields, "mask", &r.mask) : ok;
    ok = ok > 0 ? put(fields, "noise_level", PyLong_FromLong(r.noise_level)) : ok;
    ok = ok > 0 ? put_tensor(fields, "segmentation", &r.segmentation) : ok;
    ok = ok > 0 ? put(fields, "tile", PyLong_FromLong(r.tile)) : ok;
    ok = ok > 0 ? put_text(fields, "layout_json", r.layout_json) : ok;
    ok = ok > 0 ? put_tensor(fields, "guide_image", &r.guide_image) : ok;
    ok = ok > 0 ? put_number(fields, "guide_scale", r.guide_scale) : ok;
    ok = ok > 0 ? put_number(fields, "guide_uncertainty", r.guide_uncertainty) : ok;
    ok = ok > 0 ? put_pair(fields, "original_size", r.original_size, 1) : ok;
    ok = ok > 0 ? put_pair(fields, "crops_coords_top_left", r.crops_coords_top_left, 0) : ok;
    ok = ok > 0 ? put_pair(fields, "target_size", r.target_size, 1) : ok;
    ok = ok > 0 ? put_number(fields, "aesthetic_score", r.aesthetic_score) : ok;
    ok = ok > 0 ? put_number(fields, "negative_aesthetic_score", r.negative_aesthetic_score) : ok;
    ok = ok > 0 ? put_number(fields, "denoising_end", r.denoising_end) : ok;
    ok = ok > 0 ? put_number(fields, "denoising_start", r.denoising_start) : ok;
    ok = ok > 0 ? put_tensor(fields, "init_latents", &r.init_latents) : ok;
    if (ok <= 0) {
        status = ok == 0 ? ldmrt_fail_from_python() : LDMRT_ERR_INVALID_ARGUMENT;  /* -1: recorded here */
        Py_DECREF(fields);
        return status;
    }
    *out = fields;
    return LDMRT_OK;
}
