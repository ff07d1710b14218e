"""fl-lota's Flower ClientApp (a thin wrapper over ``fl_lota.federated.node``)."""
