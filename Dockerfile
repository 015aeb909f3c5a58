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
# changes at start-up, what is verified where). The C++ CPU kernels in csrc/ are
# built on first use on CPU only; the CUDA image never builds them.
# (Not built in our CI: these machines have no Docker.)
ARG BASE=public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0
FROM ${BASE}

COPY pyproject.toml README.md /opt/vllm-kvcompress/
COPY vllm_kvcompress /opt/vllm-kvcompress/vllm_kvcompress
COPY csrc /opt/vllm-kvcompress/csrc
COPY configs /opt/vllm-kvcompress/configs
# vLLM is already in the image: install only the plugin and its small dependencies.
RUN python3 -m pip install --no-cache-dir /opt/vllm-kvcompress \
    && python3 -c "import vllm, vllm_kvcompress; print('vllm', vllm.__version__)"

# The entry point loads the plugin in every vLLM process; --kv-* flags work as on the host.
ENTRYPOINT ["vllm", "serve"]
CMD ["--help"]
