//! Compliance of the host against an image: which components change and how, what remediating
//! would cost, and the overall status (SPEC §5, §6 and "beyond the seed").

use std::collections::BTreeSet;

use time::OffsetDateTime;
use vibstage_protocol::api::{
    Change, ComplianceReport, ComplianceStatus, ComponentDiff, ImageRef, Impact, Notification,
};
use vibstage_protocol::trust::check_host_acceptance;
use vibstage_protocol::{AcceptanceLevel, VerifiedImage, VibTarget};

use crate::state::InstalledImage;

/// Evaluates `image` against what is installed. `fully_staged` is whether the image's content
/// is completely staged (the R5 mark), which turns `non_compliant` into `staged` (R8).
pub fn evaluate(
    image: &VerifiedImage,
    installed: Option<&InstalledImage>,
    host_level: AcceptanceLevel,
    has_dpus: bool,
    fully_staged: bool,
) -> ComplianceReport {
    let mut notifications = Vec::new();
    let mut incompatible = false;
    let mut components = Vec::new();
    for c in &image.image.components {
        let current = installed.and_then(|i| i.components.get(&c.name));
        let change = match current {
            None => Some(Change::Add),
            Some(v) if *v < c.version => Some(Change::Upgrade),
            Some(v) if *v > c.version => Some(Change::Downgrade),
            Some(_) => None,
        };
        if let Some(change) = change {
            incompatible |= change == Change::Downgrade;
            components.push(ComponentDiff {
                component: c.name.clone(),
                installed: current.cloned(),
                desired: Some(c.version.clone()),
                change,
            });
        }
    }
    if let Some(i) = installed {
        let wanted: BTreeSet<_> = image.image.components.iter().map(|c| &c.name).collect();
        for (name, version) in &i.components {
            if !wanted.contains(name) {
                components.push(ComponentDiff {
                    component: name.clone(),
                    installed: Some(version.clone()),
                    desired: None,
                    change: Change::Remove,
                });
            }
        }
        if image.image.base_image < i.base_image {
            incompatible = true;
            notifications.push(Notification {
                code: "base_image_downgrade".into(),
                message: format!(
                    "the image's base image {} is older than the installed {}",
                    image.image.base_image, i.base_image
                ),
                retriable: false,
            });
        }
    }
    if components.iter().any(|c| c.change == Change::Downgrade) {
        notifications.push(Notification {
            code: "component_downgrade".into(),
            message: "the image would downgrade one or more components".into(),
            retriable: false,
        });
    }
    if let Err(e) = check_host_acceptance(image, host_level) {
        incompatible = true;
        notifications.push(Notification {
            code: e.code().as_str().into(),
            message: e.to_string(),
            retriable: false,
        });
    }

    let installed_vibs = installed.map(|i| &i.vibs);
    let changing = image.vibs.iter().map(|v| &v.descriptor).filter(|d| {
        (d.target == VibTarget::Host || has_dpus)
            && !installed_vibs.is_some_and(|set| set.contains(&d.sha256))
    });
    let impact = changing.fold(Impact::None, |acc, d| {
        acc.max(if d.reboot_required {
            Impact::Reboot
        } else if d.maintenance_mode {
            Impact::MaintenanceMode
        } else {
            Impact::None
        })
    });
    let same_image = installed.is_some_and(|i| i.image.digest == image.digest);
    let status = if incompatible {
        ComplianceStatus::Incompatible
    } else if same_image || (components.is_empty() && impact == Impact::None) {
        ComplianceStatus::Compliant
    } else if fully_staged {
        ComplianceStatus::Staged
    } else {
        ComplianceStatus::NonCompliant
    };
    ComplianceReport {
        status,
        image: Some(ImageRef {
            name: image.image.name.clone(),
            serial: image.image.serial,
            digest: image.digest,
        }),
        impact: if status == ComplianceStatus::Compliant {
            Impact::None
        } else {
            impact
        },
        components,
        notifications,
        checked_at: Some(OffsetDateTime::now_utc()),
    }
}
