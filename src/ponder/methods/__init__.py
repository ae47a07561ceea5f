"""The methods' math: each method's pure pieces (onepass, rise, retry, latro, ssft), the multi-turn episodes
they share, advantages, rewards and scoring (verify, rgscore), metrics and statistics."""
