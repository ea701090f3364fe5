"""Why the GPU packs (decoder/packed.py, issue 23): at MSA-4B shapes, bf16, 36 layers, one CUDA graph per
variant, the products of one decode step's tokens (batch 1 and 16) through q, k, v apart and as one fused
q|k|v weight, and through gate, up apart and fused. Random weights; ms per step from CUDA events.

    python benchmarks/gpu_fused_projections_probe.py   # H200 output: results/gpu_engine/fused_projections_probe_h200.txt
"""
import torch, torch.nn.functional as F
dev="cuda"; dt=torch.bfloat16
H,I,NQ,NKV=2560,9728,4096,1024
L=36
def graph_time(fn, reps=50):
    s=torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g=torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    for _ in range(5): g.replay()
    e0,e1=torch.cuda.Event(True),torch.cuda.Event(True)
    torch.cuda.synchronize(); e0.record()
    for _ in range(reps): g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1)/reps
for b in (1,16):
    x=torch.randn(b,1,H,device=dev,dtype=dt)
    Wq=[torch.randn(NQ,H,device=dev,dtype=dt)/50 for _ in range(L)]
    Wk=[torch.randn(NKV,H,device=dev,dtype=dt)/50 for _ in range(L)]
    Wv=[torch.randn(NKV,H,device=dev,dtype=dt)/50 for _ in range(L)]
    Wqkv=[torch.cat([a,b_,c]) for a,b_,c in zip(Wq,Wk,Wv)]
    Wg=[torch.randn(I,H,device=dev,dtype=dt)/50 for _ in range(L)]
    Wu=[torch.randn(I,H,device=dev,dtype=dt)/50 for _ in range(L)]
    Wgu=[torch.cat([a,c]) for a,c in zip(Wg,Wu)]
    sep=lambda: [ (F.linear(x,a),F.linear(x,b_),F.linear(x,c)) for a,b_,c in zip(Wq,Wk,Wv)]
    fus=lambda: [F.linear(x,w).split([NQ,NKV,NKV],-1) for w in Wqkv]
    sep2=lambda: [(F.linear(x,a),F.linear(x,c)) for a,c in zip(Wg,Wu)]
    fus2=lambda: [F.linear(x,w).split([I,I],-1) for w in Wgu]
    print(f"batch {b}: qkv separate {graph_time(sep):.3f} ms fused {graph_time(fus):.3f} ms | gate/up separate {graph_time(sep2):.3f} fused {graph_time(fus2):.3f} (36 layers)")
    del Wq,Wk,Wv,Wqkv,Wg,Wu,Wgu
