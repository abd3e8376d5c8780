/* What libldmrt's files share: the interpreter, the per-thread error, the Python host module. */
#ifndef LDMRT_INTERNAL_H
#define LDMRT_INTERNAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "ldmrt.h"

/* The most bytes one request array may hold (4 GiB: far above any bundle's largest image). */
#define LDMRT_MAX_TENSOR_BYTES ((int64_t)1 << 32)

/* --- errors (error.c): the calling thread's last error ------------------------------------- */
void ldmrt_clear_error(void);
ldmrt_status ldmrt_fail(ldmrt_status status, const char *field, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* With the GIL held, after a Python call returned NULL: the pending exception as ldmrt's status
 * (ldmrt.embed.host.describe maps ldmrt's typed errors), message and field; the exception is
 * cleared, nothing is printed. */
ldmrt_status ldmrt_fail_from_python(void);

/* --- the interpreter (interpreter.c) ------------------------------------------------------ */
/* ldmrt_init(NULL) unless done; then the GIL is taken (release with PyGILState_Release). */
ldmrt_status ldmrt_enter(PyGILState_STATE *gil);
/* host.<name>(*args) with the GIL held, `args` (a tuple) stolen; a new reference, or NULL with the
 * Python exception pending (ldmrt_fail_from_python turns it into the caller's error). */
PyObject *ldmrt_call_host(const char *name, PyObject *args);

/* --- requests (request.c) ----------------------------------------------------------------- */
/* The caller's request as the keyword dict host.generate takes (*fields, a new reference). */
ldmrt_status ldmrt_request_fields(const ldmrt_request *request, PyObject **fields);
/* Copy a caller's struct of `size` bytes over `full` (already holding the defaults); LDMRT_ERR_ABI
 * when size is below the struct's first version or above this library's. */
ldmrt_status ldmrt_copy_struct(void *full, size_t full_size, size_t first_size, const void *caller,
                               const char *name);

#endif
