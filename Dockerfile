# vLLM's OpenAI-compatible server with vllm-kvcompress installed.
#
#   docker build -t vllm-kvcompress .
#   docker run --rm -p 8000:8000 vllm-kvcompress MODEL --kv-policy pyramid --kv-budget 0.25
#
# The base is vLLM's official CPU server image of the pinned version. For GPUs:
#
#   docker build --build-arg BASE=vllm/vllm-openai:v0.32.0 -t vllm-kvcompress:cuda .
#   docker run --gpus all --rm -p 8000:8000 vllm-kvcompress:cuda MODEL --kv-policy pyramid --kv-budget 0.25
#
# On CUDA a policy serves through the plugin's Triton backend (docs/gpu.md: what it
# changes at start-up, what is verified where).
#
# The install step is scripts/install_wheel.sh: it builds a wheel from this source with
# `pip wheel . -w dist --no-build-isolation --no-deps`, compiling the C++ CPU kernels
# (csrc/) against the image's own torch, installs that wheel non-editable with
# `pip install dist/vllm_kvcompress-*.whl`, and prints `python -m vllm_kvcompress._ext
# --doctor` (which kernel path each op takes). The container then needs no compiler and
# builds nothing at run time: the kernels are loaded from the installed package. (Where
# the base image has no C++ compiler the wheel ships the source only and the kernels are
# built on first use, or the torch reference runs, with a one-line warning saying which.)
#
# Docker is not available on our machines, so this image is not built in CI; CI runs
# the same script into a fresh venv instead (tests/test_wheel.py), then checks that the
# installed package takes the prebuilt C++ path and serves a compressed request.
ARG BASE=public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0
FROM ${BASE}

COPY pyproject.toml setup.py MANIFEST.in README.md /opt/vllm-kvcompress/
COPY vllm_kvcompress /opt/vllm-kvcompress/vllm_kvcompress
COPY csrc /opt/vllm-kvcompress/csrc
COPY scripts/install_wheel.sh /opt/vllm-kvcompress/scripts/install_wheel.sh
COPY configs /opt/vllm-kvcompress/configs
# vLLM and torch are already in the image: the wheel adds the plugin and its small dependencies.
RUN PYTHON=python3 DIST=/opt/vllm-kvcompress/dist /opt/vllm-kvcompress/scripts/install_wheel.sh \
    && python3 -c "import vllm, vllm_kvcompress; print('vllm', vllm.__version__)"

# The entry point loads the plugin in every vLLM process; --kv-* flags work as on the host.
ENTRYPOINT ["vllm", "serve"]
CMD ["--help"]
