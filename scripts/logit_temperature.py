"""Diagnostic: a QDIR's held-out perplexity ratio and KL to float16 when its logits are scaled by a temperature.

    python scripts/logit_temperature.py QDIR [evaluation_data/text_eval.txt]

Shows how far the perplexity ratio moves with the logits' scale alone (docs/RESULTS.md "Seventh session").
"""
import torch, numpy as np, sys
from mopeq_export.models.loading import load_model, load_tokenizer
from mopeq_export.quantization.loader import load_quantized
from mopeq_export.evaluate import text_windows
md='../shared/models/text-moe'; qd=sys.argv[1]; data=sys.argv[2] if len(sys.argv) > 2 else "evaluation_data/text_eval.txt"
ref,_=load_model(md, device=torch.device('cpu'), dtype=torch.float32)
cand=load_quantized(qd, md, device=torch.device('cpu'), dtype=torch.float32)
tok=load_tokenizer(md)
W=text_windows(data, tok, max_windows=128)
ts=[0.9,0.95,1.0,1.02,1.04,1.06,1.08,1.1,1.15]
nr=0; nq={t:0.0 for t in ts}; kl={t:0.0 for t in ts}; n=0; ent_r=0; ent_q=0
with torch.no_grad():
  for b in W.split(8):
    lr=ref(input_ids=b).logits[:, :-1].float().reshape(-1,4096); lq=cand(input_ids=b).logits[:, :-1].float().reshape(-1,4096)
    t_=b[:,1:].reshape(-1)
    pr=torch.log_softmax(lr,-1); nr+=float(-pr.gather(-1,t_[:,None]).sum()); n+=len(t_)
    ent_r+=float(-(pr.exp()*pr).sum())
    for t in ts:
      pq=torch.log_softmax(lq*t,-1); nq[t]+=float(-pq.gather(-1,t_[:,None]).sum()); kl[t]+=float((pr.exp()*(pr-pq)).sum())
      if t==1.0: ent_q+=float(-(pq.exp()*pq).sum())
print('entropy ref %.4f quant %.4f'%(ent_r/n, ent_q/n))
for t in ts: print(t, 'ppl ratio %.4f'%np.exp((nq[t]-nr)/n), 'kl %.5f'%(kl[t]/n))
