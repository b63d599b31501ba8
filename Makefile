# make runcpu  the float32 CPU reference (C compiler only)
# make run     the CUDA build (nvcc; runs on a Hopper GPU)
# make test    the CPU test suite (CI runs this)
# make asan    the CPU test suite under AddressSanitizer + UBSan
# make demo    export the trained demo model (demo/) and generate Shakespeare from it
CC ?= gcc
NVCC ?= $(or $(shell command -v nvcc),/usr/local/cuda/bin/nvcc)
CFLAGS = -O2 -Wall -Wextra -std=gnu11
GPU_ARCH ?= -gencode=arch=compute_90a,code=sm_90a
# -compress-all: nvcc compresses only PTX by itself, so decode.cu's bf16, fp16 and fp32 objects were
# 8.3-8.9 MB each and ./run 34 MB; compressed for speed it is 15 MB (the size mode: 7 MB, ~30 s more
# compile a part), the same kernels, unpacked when the module loads
NVFLAGS = -O3 $(GPU_ARCH) -std=c++17 -Xcompiler -Wall -Xfatbin -compress-all -compress-mode=speed
KERNELS = rmsnorm.cu rope.cu matvec.cu matmul.cu attention.cu decode.cu
# a Python 3 with numpy (export.py and the tests need it)
PYTHON ?= $(firstword $(foreach p,python3 /usr/bin/python3,$(shell $(p) -c "import numpy" 2>/dev/null && echo $(p))))

runcpu: run.c tokenizer.h
	$(CC) $(CFLAGS) -fopenmp -o $@ run.c -lm

# decode.cu compiles as four objects, one per weight dtype (its dispatch says why), listed first, the
# longest first, so that `make -j` starts them before the short compiles
KERNEL_OBJS = build/decode-3.o build/decode-2.o build/decode-0.o build/decode-1.o \
              $(patsubst %.cu,build/%.o,$(filter-out decode.cu,$(KERNELS)))

build/%.o: %.cu kernels.h common.cuh attention.cuh tensor_core.cuh
	@mkdir -p build
	$(NVCC) $(NVFLAGS) -Xcompiler -fPIC -c $< -o $@

build/decode-%.o: decode.cu kernels.h common.cuh attention.cuh
	@mkdir -p build
	$(NVCC) $(NVFLAGS) -Xcompiler -fPIC -DDECODE_PART=$* -c $< -o $@

# nvcc compiles run.c as C with the host compiler and knows where the CUDA headers are
build/run.o: run.c tokenizer.h kernels.h
	@mkdir -p build
	$(NVCC) -O2 -Xcompiler -Wall,-Wextra,-std=gnu11 -DUSE_CUDA -c run.c -o $@

run: build/run.o $(KERNEL_OBJS)
	$(NVCC) $(NVFLAGS) -o $@ $^ -lm

# every kernel in one shared library, for the kernel tests (tests/gpu_kernels.py, gpu_prefill.py)
build/libkernels.so: $(KERNEL_OBJS)
	$(NVCC) $(NVFLAGS) -shared -o $@ $^

build/runcpu-asan: run.c tokenizer.h
	mkdir -p build
	$(CC) -O1 -g -Wall -Wextra -std=gnu11 -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ run.c -lm

test: runcpu
	$(PYTHON) tests/run_tests.py

asan: build/runcpu-asan
	RUNCPU=build/runcpu-asan ASAN_OPTIONS=detect_leaks=0 $(PYTHON) tests/run_tests.py

# the quick start: export the trained demo model and generate from it with its own tokenizer
demo: runcpu
	mkdir -p build
	$(PYTHON) export.py demo build/demo.bin
	./runcpu build/demo.bin -z demo/tokenizer.bin -i "ROMEO:" -n 200 -s 1

clean:
	rm -rf run runcpu build

.PHONY: test asan demo clean
