"""Engine tests run the engines' released code (make engines-test: .venv-engines has torch,
SGLang and vLLM). The dev venv has none of them: there these modules are not even collected."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("torch") else ["test_*.py"]
