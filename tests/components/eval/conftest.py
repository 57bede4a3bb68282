import os

# Set before any test imports datasets / huggingface_hub so nothing tries the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
