"""Fine-tuning: ``data`` (example streams), ``models``, ``device``, ``masks`` (scope and
LoTA masks), ``optim`` (masked optimizers), ``train`` (the shared loop), ``lota``
(calibrate, extract, sparse adaptation, LoTTO), ``lora``, ``methods`` (the registry)."""
