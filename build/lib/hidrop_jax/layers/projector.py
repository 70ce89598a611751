"""LLaVA's mlp2x_gelu projector: Linear -> GELU (exact erf, as HF's "gelu") -> Linear."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from hidrop_jax.layers.common import INIT_STD, dense


class Projector(nn.Module):
    out_features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    init_std: float = INIT_STD  # HF LLaVA initialises it with the text model's initializer_range

    @nn.compact
    def __call__(self, x):
        h = dense(self.out_features, ("embed", "mlp"), use_bias=self.use_bias,
                  dtype=self.dtype, name="linear_1", init_std=self.init_std)(x)
        h = jax.nn.gelu(h, approximate=False)
        return dense(self.out_features, ("mlp", "embed"), use_bias=self.use_bias,
                     dtype=self.dtype, name="linear_2", init_std=self.init_std)(h)
