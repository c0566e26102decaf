//! Delivery records against a real nats-server: a record write retried after its
//! reply was lost (the write landed) must not count the delivery twice.

mod common;

use switchyard_dispatcher::delivery::DeliveryRecords;
use switchyard_testkit::NatsServer;

#[tokio::test]
async fn a_retried_record_write_counts_its_delivery_once() {
    let nats = NatsServer::start();
    let prefix = format!("r{}", std::process::id());
    let bus = common::bus(&nats.url(), &prefix, "", ", storage = \"memory\"").await;
    let records = DeliveryRecords::open(&bus, 1).await.unwrap();

    // A delivery of copy 7 ends with an invocation; its write is then tried again
    // with the same mark (as after a lost reply): still one ended delivery, one
    // attempt.
    let invoked =
        |record: &mut switchyard_dispatcher::delivery::DeliveryRecord| record.attempts += 1;
    records
        .end_delivery_marked("t", 7, 41, invoked)
        .await
        .unwrap();
    records
        .end_delivery_marked("t", 7, 41, invoked)
        .await
        .unwrap();
    let record = records.read("t", 7).await.unwrap();
    assert_eq!((record.ended, record.attempts), (1, 1));
    // Every other delivery counts: each call marks its write anew.
    records.end_delivery("t", 7, invoked).await.unwrap();
    records.end_delivery("t", 7, invoked).await.unwrap();
    let record = records.read("t", 7).await.unwrap();
    assert_eq!((record.ended, record.attempts), (3, 3));
}
