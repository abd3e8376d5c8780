"""Embedding: ldmrt.h, a C ABI over the lean runtime (libldmrt hosts this Python in-process).

host.py is what the C library calls; info.py builds the library and prints its flags;
include/ (ldmrt.h, ldmrt.hpp), src/ (the C sources), CMakeLists.txt. docs/embedding.md.
"""
