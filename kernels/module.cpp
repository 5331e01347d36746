// The Python module torch_iosparse._C. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY_FRAGMENT registrations of every kernels/*.cpp file, which define torch.ops.iosparse.*.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "torch_iosparse native ops", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
