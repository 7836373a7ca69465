"""What training's in-run evaluation and the evaluation job share: the small-set readers
(`scoring.sets`: image folders, CLIP_benchmark WebDataset sets, Karpathy / COCO / Flickr
caption files, long-caption builds) and the zero-shot and retrieval metrics with the
per-set scoring around them (`scoring.zeroshot`, `scoring.retrieval`).

It imports `pipelines`' storage and shard reader and nothing of `training` or `evaluation`:
training may import it (evaluation may not be imported by training), and the evaluation job
scores its entries through the same functions, so a figure logged during a run and the one
the evaluation job reports for that checkpoint come from one definition."""
