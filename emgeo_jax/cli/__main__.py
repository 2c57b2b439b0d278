from emgeo_jax.cli import run

run()
