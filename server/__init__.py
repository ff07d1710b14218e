"""fl-lota's Flower ServerApp and strategy (thin wrappers over ``fl_lota.federated.aggregator``)."""
