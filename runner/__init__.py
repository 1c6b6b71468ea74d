"""The Pi side: run a bundle with numpy and a TFLite interpreter (runner/README.md).

Where things are, from the command line down:

    __main__.py       the command line: clip-image, clip-text, zero-shot, gemma, call, check,
                      selftest, index, search, serve (it parses arguments and prints)
    serve/            `serve`: the OpenAI HTTP API, dynamic and continuous batching, the prefix cache

    contrastive.py    the use cases of a CLIP or SigLIP bundle: embeddings, label embeddings, zero-shot
    calls.py          the use case of a Function-Gemma bundle: a conversation and tools in, calls out
    conversation.py   a user's messages and tools checked, in the chat template's form

    load.py           start-up: open a bundle, build the model of its manifest's family on a backend
    families.py       the model families by the name a manifest gives them (the one place that names them)
    bundle.py         a bundle's manifest read and checked; its host tensors memory-mapped
    check.py          `check` and `selftest`: is a bundle whole, what runs here, does the TPU agree

    clip.py           CLIP's two towers in numpy
    siglip.py         SigLIP's two towers in numpy (CLIP's encoder, its own pooling and sigmoid)
    gemma.py          Gemma-3's decoder in numpy
    nn.py             what both models share: the executor type, float_linear, softmax, finite checks
    generate.py       Gemma decoding: sampling, prefill, one token at a time
    lm_head.py        Gemma's tied LM head: cpu, tpu-preload, tpu-lazy, fp32
    tokenizer.py      text to token ids and back
    chat.py           a checkpoint's chat template rendered as transformers does (jinja2's sandbox)
    function_calls.py Function-Gemma answers parsed into calls typed by the tools' schemas
    images.py         images to a model's pixels, as its checkpoint's image processor says
    photos/           `index` and `search`: a directory of photos embedded once, searched by text or image

    executors.py      the backends behind `linear(name, x)`: emulate, cpu, edgetpu, fp32
    quant.py          the host side of an int8 linear: rows quantized in, dequantized out
    emulate.py        the Edge TPU's integer arithmetic for a Dense template
    interpreter.py    whichever TFLite interpreter this machine has
    edgetpu_codec.py  the compiled Edge TPU Dense template: parse, decode, encode, patch
    tflite_file.py    the parts of a TFLite file the templates use
    flatbuf.py        a bounds-checked FlatBuffers reader

    checkpoint.py     Hugging Face checkpoints (the fp32 backend), opened lazily
    config_values.py  typed, bounded reads of a model config
    files.py          JSON files from outside read (every failure one error naming the file); files written atomically
    errors.py         UserError, the base of every error a user can cause and fix
    packages.py       the optional packages: imported when needed, a missing one named with its install command

The runner imports nothing from prepare/: it is copied to the Pi on its own.
"""
