"""Data: the bundled `shapes_vqa` TFDS dataset, the `llava_json` builder for LLaVA's JSON, the
tokenizers, and the grain pipeline into the model's native `Inputs`.

Modules (import what you need; nothing heavy is imported here):
    features     the record schema every builder writes (feature_spec, QUESTION_TYPES)
    shapes       scene/question generator (numpy, PIL)
    shapes_vqa   TFDS builder `shapes_vqa` (ArrayRecord; configurable sizes)
    llava_json   TFDS builder `llava_json` (LLaVA-558K/665K JSON + images in manual_dir)
    sources      load_source("shapes_vqa:train=40,...", split, data_dir)
    tokenizer    shapes_vqa_tokenizer(), build_word_tokenizer(), load_tokenizer()
    templates    chat templates `plain` / `v1` / `v1_nosys`
    image        LLaVA-1.5 image preprocessing, CLIP mean/std
    pipeline     encode_example, make_loader, eval_batches
    setup        open_data(cfg, workdir): a run's tokenizer, batch spec and sources
"""
