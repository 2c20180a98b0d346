//! `project add|rm|show` and `projects`.

use std::collections::HashMap;

use hive_proto::v1::{
    CreateProjectRequest, DeleteProjectRequest, GetProjectRequest, ListProjectsRequest,
};

use crate::cli::ProjectAdd;
use crate::ctl::{CliError, Ctl};
use crate::render;

/// `project add`.
pub(crate) async fn add(ctl: &mut Ctl, a: ProjectAdd) -> Result<(), CliError> {
    let secret = match &a.secret_file {
        Some(path) => read_secret_file(path)?,
        None => a.secret.unwrap_or_default(),
    };
    let req = CreateProjectRequest {
        name: a.name.clone(),
        repo_url: a.repo,
        secret,
        branch: a.branch.unwrap_or_default(),
        tags: a.tags.unwrap_or_default(),
        size_class: a.size.unwrap_or_default(),
        private_network: a.private_network.unwrap_or_default(),
        steps: a.steps,
        timeout_secs: a.timeout.unwrap_or(0),
        env: a.env.into_iter().collect::<HashMap<_, _>>(),
    };
    let p = ctl
        .client
        .create_project(req)
        .await
        .map_err(|s| ctl.status(format!("add project {:?}", a.name), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&render::project_json(&p))
    } else {
        ctl.out(&format!("project {} added (id {})\n", p.name, p.id))
    }
}

/// `project rm`.
pub(crate) async fn remove(ctl: &mut Ctl, name: String) -> Result<(), CliError> {
    ctl.client
        .delete_project(DeleteProjectRequest {
            project: name.clone(),
        })
        .await
        .map_err(|s| ctl.status(format!("delete project {name:?}"), s))?;
    if ctl.json {
        ctl.out_json(&serde_json::json!({ "deleted": name }))
    } else {
        ctl.out(&format!("project {name} deleted\n"))
    }
}

/// `project show`.
pub(crate) async fn show(ctl: &mut Ctl, name: String, now: i64) -> Result<(), CliError> {
    let p = ctl
        .client
        .get_project(GetProjectRequest {
            project: name.clone(),
        })
        .await
        .map_err(|s| ctl.status(format!("project {name:?}"), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&render::project_json(&p))
    } else {
        ctl.out(&render::project_text(&p, now))
    }
}

/// `projects`.
pub(crate) async fn list(ctl: &mut Ctl, now: i64) -> Result<(), CliError> {
    let ps = ctl
        .client
        .list_projects(ListProjectsRequest {})
        .await
        .map_err(|s| ctl.status("list projects", s))?
        .into_inner()
        .projects;
    if ctl.json {
        ctl.out_json(&serde_json::Value::Array(
            ps.iter().map(render::project_json).collect(),
        ))
    } else {
        ctl.out(&render::projects_table(&ps, now))
    }
}

/// The webhook secret from a file (`-`: stdin), one trailing newline dropped; empty refused.
fn read_secret_file(path: &std::path::Path) -> Result<String, CliError> {
    use std::io::Read;
    let refused = |message: String| CliError::Refused {
        what: format!("--secret-file {}", path.display()),
        message,
    };
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| refused(e.to_string()))?;
    } else {
        text = std::fs::read_to_string(path).map_err(|e| refused(e.to_string()))?;
    }
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    crate::cli::parse_secret(&text).map_err(refused)
}
