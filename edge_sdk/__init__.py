"""fedlm-edge: federated QLoRA post-training of open-weight GGUF models on the device.

Heavy dependencies (llama-cpp-python, torch) are imported lazily by the modules that need
them, so that `import edge_sdk` stays cheap.
"""

__version__ = "0.1.0"
