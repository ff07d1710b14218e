"""Imported first by both Flower apps (``clients/app.py``, ``server/app.py``): the model
libraries, whole, in one thread at a time.

Flower's simulation loads the ServerApp in a thread of its own while its main thread loads
the ClientApp, so both apps' imports can run at the same moment in one process. accelerate
(1.15, which transformers imports for its model and generation code) has circular imports
inside it that fail when two threads import different parts of it at once
(huggingface/accelerate#4173 and #4215): the run then stops with Flower's exit code 607,
"cannot import name 'AlignDevicesHook' from partially initialized module 'accelerate.hooks'".
Importing this module first makes the second app wait: Python holds this module's import
lock until the first thread has imported it. That holds only while nothing the apps import
before it (flwr, ``fl_lota/__init__``, ``wire``) imports transformers or accelerate: a test
checks.
"""

# transformers imports accelerate here when it is installed (peft needs it, so it is)
import transformers.generation.utils
import transformers.modeling_utils  # noqa: F401
