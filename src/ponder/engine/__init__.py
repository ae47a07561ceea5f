"""The engine: rendering (chat, prompts), records (data), prefix trees and masks (tree, masks), log-probs,
sampling (rollout, decode, vllm_engine), models and the testbed, several processes (dist, runtime)."""
