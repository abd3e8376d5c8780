/* The calling thread's last error: a message and the input at fault, freed with the thread. */
#include "internal.h"     /* Python.h first */

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct thread_error {
    char *message;
    char *field;
} thread_error;

static pthread_key_t error_key;
static pthread_once_t error_once = PTHREAD_ONCE_INIT;

static void free_thread_error(void *pointer) {
    thread_error *error = pointer;
    free(error->message);
    free(error->field);
    free(error);
}

static void make_key(void) { pthread_key_create(&error_key, free_thread_error); }

static thread_error *this_thread(void) {
    pthread_once(&error_once, make_key);
    thread_error *error = pthread_getspecific(error_key);
    if (error == NULL) {
        error = calloc(1, sizeof *error);
        if (error != NULL && pthread_setspecific(error_key, error) != 0) {
            free(error);
            error = NULL;
        }
    }
    return error;
}

static void store(ldmrt_status status, const char *field, char *message) {
    thread_error *error = this_thread();
    if (error == NULL) {
        free(message);
        return;
    }
    free(error->message);
    free(error->field);
    error->message = message;
    error->field = (field != NULL && field[0] != '\0') ? strdup(field) : NULL;
    (void)status;
}

void ldmrt_clear_error(void) { store(LDMRT_OK, NULL, NULL); }

ldmrt_status ldmrt_fail(ldmrt_status status, const char *field, const char *format, ...) {
    va_list args;
    va_start(args, format);
    char *message = NULL;
    if (vasprintf(&message, format, args) < 0)
        message = NULL;
    va_end(args);
    store(status, field, message);
    return status;
}

/* A Python object's str() as a malloc'd UTF-8 string (NULL on failure, never an exception). */
static char *text_of(PyObject *object) {
    if (object == NULL)
        return NULL;
    PyObject *text = PyObject_Str(object);
    char *copy = NULL;
    if (text != NULL) {
        const char *utf8 = PyUnicode_AsUTF8(text);
        if (utf8 != NULL)
            copy = strdup(utf8);
        Py_DECREF(text);
    }
    PyErr_Clear();
    return copy;
}

ldmrt_status ldmrt_fail_from_python(void) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL)
        PyException_SetTraceback(value, traceback);
    ldmrt_status status = LDMRT_ERR_INTERNAL;
    char *message = NULL, *field = NULL;
    PyObject *described = value != NULL ? ldmrt_call_host("describe", Py_BuildValue("(O)", value)) : NULL;
    long code;
    if (described != NULL && PyTuple_Check(described) && PyTuple_GET_SIZE(described) == 3
        && (code = PyLong_AsLong(PyTuple_GET_ITEM(described, 0))) >= LDMRT_OK && code <= LDMRT_ERR_INTERNAL) {
        status = (ldmrt_status)code;
        message = text_of(PyTuple_GET_ITEM(described, 1));
        if (PyTuple_GET_ITEM(described, 2) != Py_None)
            field = text_of(PyTuple_GET_ITEM(described, 2));
    } else {      /* the host itself failed (a broken installation): its own words */
        char *what = text_of(value);
        const char *name = type != NULL ? ((PyTypeObject *)type)->tp_name : "unknown error";
        if (asprintf(&message, "%s: %s", name, what != NULL ? what : "") < 0)
            message = NULL;
        free(what);
    }
    PyErr_Clear();
    Py_XDECREF(described);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    store(status, field, message);
    free(field);
    return status;
}

const char *ldmrt_last_error(void) {
    thread_error *error = this_thread();
    return error != NULL && error->message != NULL ? error->message : "";
}

const char *ldmrt_last_error_field(void) {
    thread_error *error = this_thread();
    return error != NULL && error->field != NULL ? error->field : "";
}

const char *ldmrt_status_name(ldmrt_status status) {
    switch (status) {
    case LDMRT_OK: return "LDMRT_OK";
    case LDMRT_ERR_INVALID_ARGUMENT: return "LDMRT_ERR_INVALID_ARGUMENT";
    case LDMRT_ERR_BUNDLE: return "LDMRT_ERR_BUNDLE";
    case LDMRT_ERR_STALE_ENGINE: return "LDMRT_ERR_STALE_ENGINE";
    case LDMRT_ERR_BACKEND_UNAVAILABLE: return "LDMRT_ERR_BACKEND_UNAVAILABLE";
    case LDMRT_ERR_CANCELLED: return "LDMRT_ERR_CANCELLED";
    case LDMRT_ERR_GENERATION: return "LDMRT_ERR_GENERATION";
    case LDMRT_ERR_LORA: return "LDMRT_ERR_LORA";
    case LDMRT_ERR_INSTALL: return "LDMRT_ERR_INSTALL";
    case LDMRT_ERR_ABI: return "LDMRT_ERR_ABI";
    case LDMRT_ERR_IO: return "LDMRT_ERR_IO";
    case LDMRT_ERR_OUT_OF_MEMORY: return "LDMRT_ERR_OUT_OF_MEMORY";
    case LDMRT_ERR_INTERNAL: return "LDMRT_ERR_INTERNAL";
    }
    return "LDMRT_ERR_UNKNOWN";
}
