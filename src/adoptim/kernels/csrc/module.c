/*
 * The kernel library is built as an extension module so that the installer places it inside the
 * package; Python loads it with ctypes. This empty module only keeps a plain `import` of it harmless.
 */
#include <Python.h>

static struct PyModuleDef adopt_cpu_module = {
    PyModuleDef_HEAD_INIT, "_adopt_cpu", "Fused CPU ADOPT kernel (called through ctypes).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__adopt_cpu(void) { return PyModule_Create(&adopt_cpu_module); }
