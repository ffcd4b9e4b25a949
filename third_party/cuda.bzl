"""Detects the CUDA toolkit at /usr/local/cuda (or $CUDA_PATH). Without it the build is CPU-only."""

def _cuda_configure_impl(ctx):
    cuda = ctx.os.environ.get("CUDA_PATH", "/usr/local/cuda")
    nvcc = ctx.path(cuda + "/bin/nvcc")
    available = nvcc.exists
    ctx.file("defs.bzl", "CUDA_AVAILABLE = %s\nCUDA_PATH = %r\n" % (available, cuda))
    build = ['package(default_visibility = ["//visibility:public"])']
    if available:
        ctx.symlink(cuda + "/include", "include")
        ctx.symlink(cuda + "/lib64", "lib64")
        build.append("""
# The toolkit's headers alone: what the CPU emulator (tests/cuda_emu) builds against.
cc_library(
    name = "headers",
    hdrs = glob(["include/**"]),
    includes = ["include"],
)

cc_library(
    name = "cudart_static",
    # All of include/: CUDA 13's cuda_fp16.h includes extension-less headers (<nv/target>).
    hdrs = glob(["include/**"]),
    includes = ["include"],
    srcs = ["lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lpthread", "-lrt"],
    linkstatic = True,
)
""")
    ctx.file("BUILD.bazel", "\n".join(build) + "\n")

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["CUDA_PATH"],
    local = True,
)
