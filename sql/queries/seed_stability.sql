-- Do SAEs trained with other seeds find the same features? Per backbone and kind of pair
-- (trained: two seeds; trained_vs_random: a trained SAE against an untrained one of its shape;
-- random: two untrained ones; saev_core.stability): the mean over pairs of the Hungarian-matched
-- decoder cosine and of the matched features' activation correlation, and trained_minus_random:
-- how far the kind's mean cosine lies above that of the random pairs (the bar "stable" must
-- clear); random_cosine_scale is sqrt(2 ln d_sae / d_model), what the best matching of random
-- unit vectors reaches.
-- param backbone: one backbone; every backbone when omitted (default null)
with pairs as (
    select * from compare_stability
    where ($backbone is null or backbone = $backbone)
),

per_kind as (
    select
        backbone,
        kind,
        count(*) as n_pairs,
        avg(mean_cos) as mean_cos,
        avg(cos_q50) as median_cos,
        avg(mean_corr) as mean_corr,
        any_value(random_cosine_scale) as random_cosine_scale
    from pairs
    group by backbone, kind
)

select
    per_kind.*,
    per_kind.mean_cos - rnd.mean_cos as trained_minus_random
from per_kind
left join per_kind as rnd
    on rnd.backbone = per_kind.backbone and rnd.kind = 'random'
order by per_kind.backbone, case per_kind.kind when 'trained' then 0 when 'trained_vs_random' then 1 else 2 end
