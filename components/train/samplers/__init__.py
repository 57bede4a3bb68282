"""Training-data samplers: which blocks each optimizer step of the shared trainer uses.

``registry.SAMPLERS`` maps a recipe's ``sampler: {method: ...}`` key to a class. This package
init stays empty on purpose: ``components.train.trainer`` imports ``samplers.base``, and
``samplers.uniform`` imports ``BatchOrder`` from the trainer, so importing the registry here
would be an import cycle.
"""
