"""Engine plugins: SGLang (`sglang.srt.plugins`) and vLLM (`vllm.general_plugins`) entry points
that take moeplace's placement live and export the routing counts the operator reads."""
