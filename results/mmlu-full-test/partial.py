"""The partial figures of results/README.md section 22, from the chunks done so far (run.sh smollm2-pool600 and gemma):
the pool-trained SmolLM2 against its zero-shot answers on the same first N questions (paired), and Gemma-3 zero-shot
on its first N. Reads $RUNS (default /work/runs/mmlu)."""
import json, os
from pathlib import Path
from textdistill.report import paired_accuracy_difference
runs = Path(os.environ.get('RUNS', '/work/runs/mmlu'))
zs = [json.loads(l) for l in open(runs/'smollm2-zero-shot-full/samples_mmlu.jsonl')]
chunks = []
k = 0
while (runs/f'smollm2-135m-pool10k-600steps/chunk{k}/results.json').is_file():
    chunks += [json.loads(l) for l in open(runs/f'smollm2-135m-pool10k-600steps/chunk{k}/samples_mmlu.jsonl')]
    k += 1
n = len(chunks)
assert [r['item_id'] for r in chunks] == [r['item_id'] for r in zs[:n]]
a = [r['acc'] for r in zs[:n]]; b = [r['acc'] for r in chunks]
print('chunks', k, 'n', n, 'zs', sum(a)/n, 'pool600', sum(b)/n)
print(paired_accuracy_difference([a], [b]))
g = []
k = 0
while (runs/f'gemma3-270m-zero-shot/chunk{k}/results.json').is_file():
    g += [json.loads(l) for l in open(runs/f'gemma3-270m-zero-shot/chunk{k}/samples_mmlu.jsonl')]; k += 1
if g:
    import math
    acc = sum(r['acc'] for r in g)/len(g); se = math.sqrt(acc*(1-acc)/len(g))
    print('gemma chunks', k, 'n', len(g), 'acc', acc, '+-', se, 'smollm2 zs same q', sum(r['acc'] for r in zs[:len(g)])/len(g))
