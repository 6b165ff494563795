"""Data-parallel large-batch training on DeepSpeed from a YAML recipe.

    python -m trainers train RECIPE.yaml [key.path=value ...]
    deepspeed --num_gpus N --module trainers train RECIPE.yaml      (--num_accelerators N on CPU)
    torchrun --nproc_per_node N -m trainers train RECIPE.yaml
    python -m trainers check RECIPE.yaml                            (validate + one-step dry run on CPU)
    python -m trainers prepare RECIPE.yaml                          (tokenise text into the shard cache /
                                                                     check an image folder layout)
"""

from .recipe import RecipeError, load_recipe

__all__ = ["RecipeError", "load_recipe"]
