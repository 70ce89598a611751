"""Data: the bundled `shapes_vqa` TFDS dataset, the `llava_json` builder for LLaVA's JSON, the
tokenizers, and the grain pipeline into the model's native `Inputs`.

Modules (import what you need; nothing heavy is imported here):
    shapes       scene/question generator (numpy, PIL)
    shapes_vqa   TFDS builder `shapes_vqa` (ArrayRecord; configurable sizes)
    llava_json   TFDS builder `llava_json` (LLaVA-558K/665K JSON + images in manual_dir)
    sources      load_source("shapes_vqa:train=40,...", split, data_dir)
    tokenizer    shapes_vqa_tokenizer(), build_word_tokenizer(), load_tokenizer()
    templates    chat templates `plain` / `v1`
    image        LLaVA-1.5 image preprocessing
    pipeline     encode_example, make_loader, eval_batches, to_inputs
"""
