//! The standard gRPC services beside ours: health checking answers SERVING for the whole server
//! and for `hive.v1.ControlPlane`, and server reflection lists the hive.v1 services (so
//! `grpcurl` works without the .proto files).

mod common;

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test]
async fn health_says_serving_and_reflection_lists_the_control_plane() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = common::start(&db.url).await;
    let url = format!("http://{}", handle.grpc_addr);

    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "hive.v1.ControlPlane",
        "hive.v1.BoxAgent",
        "hive.v1.Connector",
    ] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("health check of {service:?}: {s}"))
            .into_inner();
        assert_eq!(
            reply.status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.expect("a reflection reply").unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a list of services: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "hive.v1.ControlPlane",
        "hive.v1.BoxAgent",
        "hive.v1.Connector",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    handle.shutdown().await;
}
