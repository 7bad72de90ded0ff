"""mule: multi-objective unlearning of large language models.

The core method is bidirectional top-K logit distillation from a frozen teacher that is the base model
steered by per-objective intention prompts (Zhong, Liu, Zhu 2026, arXiv 2604.15482).
"""

__version__ = "0.1.0"
