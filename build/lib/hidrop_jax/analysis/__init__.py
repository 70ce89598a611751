"""The layer-choice analysis (probes and statistics on a trained model, plots); its rules
for proposing a schedule live with the method, in `hidrop_jax.hidrop.propose`."""
