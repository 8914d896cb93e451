//! Models and their deployments: which providers serve a public model, under which
//! upstream names, with which quotas, tried in which order.

use super::money::usd_to_nanousd;
use super::named::{sub, Named, Ref};
use super::raw::{RawBalance, RawDeployment, RawModel};
use super::report::{child, item, Report};
use super::{Balance, Deployment, Model, Price, Provider};
use std::collections::HashMap;
use std::sync::Arc;

pub(super) fn build_model(
    name: &str,
    raw: RawModel,
    at: &str,
    providers: &Named<Provider>,
    report: &mut Report,
) -> Option<Model> {
    let mut ok = true;
    let deployments = deployments(name, &raw, at, providers, report);
    let mut money = |key: &str, usd: f64, report: &mut Report| {
        usd_to_nanousd(usd)
            .map_err(|e| {
                report.error(sub(at, "price", key), e);
                ok = false;
            })
            .unwrap_or(0)
    };
    let input = money("input_per_mtok", raw.price.input_per_mtok, report);
    let output = money("output_per_mtok", raw.price.output_per_mtok, report);
    let cached = match raw.price.cached_input_per_mtok {
        Some(usd) => money("cached_input_per_mtok", usd, report),
        None => input,
    };
    if cached > input {
        report.warn(
            sub(at, "price", "cached_input_per_mtok"),
            "cached input costs more than uncached input",
        );
    }
    if raw.max_output_tokens == Some(0) {
        report.error(child(at, "max_output_tokens"), "must be greater than 0");
        ok = false;
    }
    let balance = match raw.balance.unwrap_or(RawBalance::LeastBusy) {
        RawBalance::LeastBusy => Balance::LeastBusy,
        RawBalance::Weighted => Balance::Weighted,
        RawBalance::LowestLatency => Balance::LowestLatency,
    };
    let deployments = deployments?;
    let upstream_names = deployments
        .iter()
        .map(|d| d.upstream_model.as_str())
        .collect::<Vec<_>>()
        .join(",");
    ok.then(|| Model {
        name: name.to_string(),
        deployments,
        balance,
        upstream_names,
        price: Price {
            input_nanousd_per_mtok: input,
            output_nanousd_per_mtok: output,
            cached_input_nanousd_per_mtok: cached,
        },
        max_output_tokens: raw.max_output_tokens,
    })
}

/// The model's deployments: its `deployments` list, or the one that `provider` and
/// `upstream_model` describe (the form every earlier config used).
fn deployments(
    name: &str,
    raw: &RawModel,
    at: &str,
    providers: &Named<Provider>,
    report: &mut Report,
) -> Option<Vec<Arc<Deployment>>> {
    let list: Vec<(String, &RawDeployment)>;
    let single;
    match (&raw.provider, &raw.deployments) {
        (Some(_), Some(_)) => {
            report.error(
                child(at, "deployments"),
                "give either `provider` (one deployment) or `deployments`, not both",
            );
            return None;
        }
        (None, None) => {
            report.error(
                child(at, "provider"),
                "required: the provider that serves this model (or a `deployments` list)",
            );
            return None;
        }
        (Some(p), None) => {
            single = RawDeployment {
                provider: p.clone(),
                upstream_model: raw.upstream_model.clone(),
                weight: None,
                rpm: None,
                tpm: None,
            };
            list = vec![(at.to_string(), &single)];
        }
        (None, Some(deps)) => {
            if raw.upstream_model.is_some() {
                report.error(
                    child(at, "upstream_model"),
                    "belongs in each entry of `deployments` when the model has a list",
                );
                return None;
            }
            if deps.is_empty() {
                report.error(
                    child(at, "deployments"),
                    "must list at least one deployment",
                );
                return None;
            }
            let list_at = child(at, "deployments");
            list = deps
                .iter()
                .enumerate()
                .map(|(i, d)| (item(&list_at, i), d))
                .collect();
        }
    }
    let mut out: Vec<Arc<Deployment>> = Vec::with_capacity(list.len());
    let mut ok = true;
    for (dep_at, d) in list {
        match deployment(name, d, &dep_at, providers, report) {
            Some(dep) if out.iter().any(|o| o.key == dep.key) => {
                report.error(
                    dep_at,
                    format!("`{}` is listed twice for this model", dep.key),
                );
                ok = false;
            }
            Some(dep) => out.push(Arc::new(dep)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn deployment(
    name: &str,
    raw: &RawDeployment,
    at: &str,
    providers: &Named<Provider>,
    report: &mut Report,
) -> Option<Deployment> {
    let mut ok = true;
    let provider = match providers.get(&raw.provider) {
        Ref::Found(p) => Some(p.clone()),
        Ref::Broken => None,
        Ref::Missing => {
            report.error(
                child(at, "provider"),
                format!(
                    "unknown provider `{}` ({})",
                    raw.provider,
                    providers.known()
                ),
            );
            None
        }
    };
    let upstream_model = raw
        .upstream_model
        .clone()
        .unwrap_or_else(|| name.to_string());
    if upstream_model.trim().is_empty() {
        report.error(child(at, "upstream_model"), "must not be empty");
        ok = false;
    }
    for (key, v) in [
        ("weight", raw.weight.map(u64::from)),
        ("rpm", raw.rpm),
        ("tpm", raw.tpm),
    ] {
        if v == Some(0) {
            let hint = if key == "weight" {
                "must be at least 1 (leave the deployment out to stop using it)"
            } else {
                "must be at least 1 (leave it out for no quota)"
            };
            report.error(child(at, key), hint);
            ok = false;
        }
    }
    let provider = provider?;
    ok.then(|| Deployment {
        key: format!("{}/{}", provider.name, upstream_model),
        provider,
        upstream_model,
        weight: raw.weight.unwrap_or(1),
        rpm: raw.rpm,
        tpm: raw.tpm,
    })
}

/// A provider account's quota is per upstream model, whichever public models use it:
/// two models naming the same deployment share its counters and cooldown, so they
/// must agree on its quota.
pub(super) fn check_shared_quotas(models: &Named<Model>, report: &mut Report) {
    let mut seen: HashMap<&str, (&str, Option<u64>, Option<u64>)> = HashMap::new();
    for m in models.values() {
        for d in &m.deployments {
            match seen.get(d.key.as_str()) {
                Some(&(other, rpm, tpm)) if (rpm, tpm) != (d.rpm, d.tpm) => report.error(
                    child("models", &m.name),
                    format!(
                        "deployment `{}` has another rpm/tpm in model `{other}`; \
                         a provider's quota is one, so give both the same",
                        d.key
                    ),
                ),
                Some(_) => {}
                None => {
                    seen.insert(&d.key, (&m.name, d.rpm, d.tpm));
                }
            }
        }
    }
}
