# Metadata is in setup.cfg. The one compiled module, the ring thread's path for READs the page
# cache holds (lvmirror/tcmu/_fastread.c), is declared here: setup.cfg cannot declare
# extensions. It needs gcc and Python's headers (python3-dev); tools/bootstrap installs them.
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("lvmirror.tcmu._fastread", ["lvmirror/tcmu/_fastread.c"],
              extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]),
])
