"""MLX + mlx-lm (the optional extra `moescope[mlx]`): load a checkpoint with mlx-lm (`loading`), run it
through transformers' causal-LM interface as moescope uses it (`model`), capture its routing (`capture`),
write it really quantised (`quantize`), and hold each expert at its own width (`packed`). Modules here
import mlx; nothing outside imports them unless the MLX backend was asked for."""
