"""The project around the Hub files: data, curriculum, training, evaluation, conversion.

It imports the model, configuration and processor from the repository root, where they live as on the Hub; the
root files never import from here, so a Hub download needs nothing but themselves.
"""
