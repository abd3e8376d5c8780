/* The interpreter: started here (own) or joined (already running in the process), once. */
#include "internal.h"     /* Python.h first */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifndef LDMRT_DEFAULT_VENV
#define LDMRT_DEFAULT_VENV ""     /* `ldmrt embed --build` compiles in the venv it runs from */
#endif
#ifndef LDMRT_VERSION
#define LDMRT_VERSION "0.0.0"
#endif

static struct {
    pthread_mutex_t lock;
    int done;                     /* ldmrt_init ran: status and message are its outcome */
    ldmrt_status status;
    char *message;
    char *field;
    PyObject *host;               /* ldmrt.embed.host; lives as long as the process */
    ldmrt_log_fn log;
    void *log_user_data;
} state = {.lock = PTHREAD_MUTEX_INITIALIZER};

int32_t ldmrt_abi_version(void) { return LDMRT_ABI_VERSION; }

const char *ldmrt_library_version(void) { return LDMRT_VERSION; }

void ldmrt_init_options_init(ldmrt_init_options *options) {
    if (options == NULL)
        return;
    memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
}

static int is_file(const char *path) {
    struct stat info;
    return stat(path, &info) == 0 && S_ISREG(info.st_mode);
}

/* The "version = 3.11.7" (or "version_info") line of a venv's pyvenv.cfg, as major.minor. */
static int venv_python(const char *config_path, int *major, int *minor) {
    FILE *file = fopen(config_path, "r");
    if (file == NULL)
        return 0;
    char line[512];
    int found = 0;
    while (!found && fgets(line, sizeof line, file) != NULL) {
        char key[64];
        int a, b;
        if (sscanf(line, " %63[a-z_] = %d.%d", key, &a, &b) == 3
            && (strcmp(key, "version") == 0 || strcmp(key, "version_info") == 0)) {
            *major = a;
            *minor = b;
            found = 1;
        }
    }
    fclose(file);
    return found;
}

/* The venv to use: the option, $LDMRT_VENV, the compiled-in default; NULL: none. */
static const char *chosen_venv(const ldmrt_init_options *options) {
    if (options->venv != NULL && options->venv[0] != '\0')
        return options->venv;
    const char *from_env = getenv("LDMRT_VENV");
    if (from_env != NULL && from_env[0] != '\0')
        return from_env;
    return LDMRT_DEFAULT_VENV[0] != '\0' ? LDMRT_DEFAULT_VENV : NULL;
}

/* The venv's interpreter path in *python (malloc'd), or an error naming the venv. */
static ldmrt_status check_venv(const char *venv, char **python) {
    char *config = NULL;
    if (asprintf(&config, "%s/pyvenv.cfg", venv) < 0 || asprintf(python, "%s/bin/python", venv) < 0) {
        free(config);
        return ldmrt_fail(LDMRT_ERR_OUT_OF_MEMORY, NULL, "out of memory");
    }
    int major = 0, minor = 0;
    ldmrt_status status = LDMRT_OK;
    if (!is_file(config))
        status = ldmrt_fail(LDMRT_ERR_INSTALL, "venv", "venv %s: no pyvenv.cfg there: expected a virtual "
                            "environment with ldmrt installed (python3 -m venv DIR && DIR/bin/pip install "
                            "ldmrt)", venv);
    else if (!venv_python(config, &major, &minor))
        status = ldmrt_fail(LDMRT_ERR_INSTALL, "venv", "venv %s: pyvenv.cfg names no Python version", venv);
    else if (major != PY_MAJOR_VERSION || minor != PY_MINOR_VERSION)
        status = ldmrt_fail(LDMRT_ERR_INSTALL, "venv", "venv %s was made by Python %d.%d; this libldmrt "
                            "embeds Python %d.%d: rebuild it with that venv's ldmrt (ldmrt embed --build)",
                            venv, major, minor, PY_MAJOR_VERSION, PY_MINOR_VERSION);
    free(config);
    if (status != LDMRT_OK) {
        free(*python);
        *python = NULL;
    }
    return status;
}

/* Start our own interpreter (the venv's paths, as if its bin/python ran); the GIL is held after. */
static ldmrt_status start_interpreter(const ldmrt_init_options *options, const char *venv) {
    char *python = NULL;
    if (venv != NULL) {
        ldmrt_status status = check_venv(venv, &python);
        if (status != LDMRT_OK)
            return status;
    }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = options->install_signal_handlers != 0;
    config.parse_argv = 0;
    PyStatus status = PyStatus_Ok();
    if (python != NULL)      /* getpath finds pyvenv.cfg next to it: sys.prefix is the venv */
        status = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (!PyStatus_Exception(status))
        status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    free(python);
    if (PyStatus_Exception(status))
        return ldmrt_fail(LDMRT_ERR_INSTALL, NULL, "cannot start Python %d.%d%s%s: %s%s%s", PY_MAJOR_VERSION,
                          PY_MINOR_VERSION, venv ? " from venv " : "", venv ? venv : "",
                          status.func ? status.func : "", status.func ? ": " : "",
                          status.err_msg ? status.err_msg : "unknown reason");
    return LDMRT_OK;
}

/* Python calls this for each log record: (level, message). */
static PyObject *forward_log(PyObject *self, PyObject *args) {
    (void)self;
    int level;
    const char *message;
    if (!PyArg_ParseTuple(args, "is", &level, &message))
        return NULL;
    if (state.log != NULL) {
        Py_BEGIN_ALLOW_THREADS
        state.log(state.log_user_data, level, message);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyMethodDef log_method = {"log", forward_log, METH_VARARGS, "ldmrt's log records to the C caller"};

/* Import the host module and configure it; the GIL is held. */
static ldmrt_status import_host(const char *venv, int own) {
    if (venv != NULL && !own) {      /* joined: the venv's packages next to the host's own */
        PyObject *site = PyImport_ImportModule("site");
        PyObject *added = site == NULL ? NULL : PyObject_CallMethod(
            site, "addsitedir", "N", PyUnicode_FromFormat("%s/lib/python%d.%d/site-packages", venv,
                                                          PY_MAJOR_VERSION, PY_MINOR_VERSION));
        Py_XDECREF(site);
        if (added == NULL)
            return ldmrt_fail_from_python();
        Py_DECREF(added);
    }
    PyObject *host = PyImport_ImportModule("ldmrt.embed.host");
    if (host == NULL) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject *text = value != NULL ? PyObject_Str(value) : NULL;
        const char *reason = text != NULL ? PyUnicode_AsUTF8(text) : NULL;
        ldmrt_status status = ldmrt_fail(
            LDMRT_ERR_INSTALL, venv != NULL ? "venv" : NULL, "cannot import ldmrt%s%s: %s: %s; install it "
            "(pip install ldmrt) or name its virtual environment (ldmrt_init_options.venv, $LDMRT_VENV)",
            venv != NULL ? " from venv " : "", venv != NULL ? venv : "",
            type != NULL ? ((PyTypeObject *)type)->tp_name : "ImportError", reason ? reason : "");
        Py_XDECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        PyErr_Clear();
        return status;
    }
    state.host = host;
    PyObject *log = state.log != NULL ? PyCFunction_New(&log_method, NULL) : (Py_INCREF(Py_None), Py_None);
    PyObject *done = log == NULL ? NULL
        : ldmrt_call_host("configure", Py_BuildValue("(NOs)", log, own ? Py_True : Py_False, venv ? venv : ""));
    if (done == NULL)
        return ldmrt_fail_from_python();
    Py_DECREF(done);
    return LDMRT_OK;
}

static void remember(ldmrt_status status) {
    state.status = status;
    state.message = status != LDMRT_OK ? strdup(ldmrt_last_error()) : NULL;
    state.field = status != LDMRT_OK ? strdup(ldmrt_last_error_field()) : NULL;
    state.done = 1;
}

ldmrt_status ldmrt_init(const ldmrt_init_options *caller) {
    ldmrt_clear_error();
    ldmrt_init_options options;
    ldmrt_init_options_init(&options);
    pthread_mutex_lock(&state.lock);
    if (state.done) {
        ldmrt_status status = state.status;
        if (status != LDMRT_OK)
            ldmrt_fail(status, state.field, "%s", state.message ? state.message : "");
        pthread_mutex_unlock(&state.lock);
        return status;
    }
    ldmrt_status status = caller == NULL ? LDMRT_OK
        : ldmrt_copy_struct(&options, sizeof options, sizeof options, caller, "ldmrt_init_options");
    if (status != LDMRT_OK) {      /* a caller's mistake, not the process's: ldmrt_init may be called again */
        pthread_mutex_unlock(&state.lock);
        return status;
    }
    state.log = options.log;
    state.log_user_data = options.log_user_data;
    const char *venv = chosen_venv(&options);
    int own = !Py_IsInitialized();
    if (own) {
        status = start_interpreter(&options, venv);
        if (status == LDMRT_OK) {
            status = import_host(venv, own);
            PyEval_SaveThread();       /* the GIL goes to whichever thread calls next */
        }
    } else {
        PyGILState_STATE gil = PyGILState_Ensure();
        status = import_host(venv, own);
        PyGILState_Release(gil);
    }
    remember(status);
    pthread_mutex_unlock(&state.lock);
    return status;
}

ldmrt_status ldmrt_enter(PyGILState_STATE *gil) {
    ldmrt_status status = ldmrt_init(NULL);
    if (status == LDMRT_OK)
        *gil = PyGILState_Ensure();
    return status;
}

PyObject *ldmrt_call_host(const char *name, PyObject *args) {
    if (args == NULL)
        return NULL;
    PyObject *function = state.host != NULL ? PyObject_GetAttrString(state.host, name) : NULL;
    if (function == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_RuntimeError, "ldmrt.embed.host is not loaded");
    PyObject *result = function != NULL ? PyObject_CallObject(function, args) : NULL;
    Py_XDECREF(function);
    Py_DECREF(args);
    return result;
}
