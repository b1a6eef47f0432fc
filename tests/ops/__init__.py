# Makes the op tests the package "ops": their module names (ops.test_conv, ...) cannot clash with
# test files of the same basename elsewhere under tests/ (tests/kernels, ...).
