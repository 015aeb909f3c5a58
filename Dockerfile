# vLLM's OpenAI-compatible server with vllm-kvcompress installed.
#
#   docker build -t vllm-kvcompress .
#   docker run --rm -p 8000:8000 vllm-kvcompress MODEL --kv-policy pyramid --kv-budget 0.25
#
# The base is vLLM's official CPU server image of the pinned version: the
# compressed attention backend runs on vLLM's CPU build in this release. With
# --build-arg BASE=vllm/vllm-openai:v0.32.0 (the CUDA image) the plugin loads but
# refuses a policy at start-up until its CUDA backend lands (--kv-policy none works).
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
