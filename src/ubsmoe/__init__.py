"""ubsmoe: resource-adaptive federated fine-tuning with sparse Mixture-of-Experts (UB-SMoE)."""

__version__ = "0.1.0"
