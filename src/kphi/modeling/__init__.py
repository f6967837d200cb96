"""What a standalone export ships, and nothing else: the configurations, the models, the projection kinds and
their registry. Every module here imports only its siblings, transformers and torch, so that
``save_pretrained`` can copy them beside a checkpoint that loads where kphi is not installed."""
