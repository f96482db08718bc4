#!/usr/bin/env python3
"""svc-messaging from Python: create a conversation, subscribe to it, upload a file, and
receive the FILE message the upload posted.

Generate the SDK first (from the repository root):
    buf generate --template sdk/buf.gen.yaml
then run (the service listening on 127.0.0.1:50051 with its default trusted-header auth):
    python3 sdk/python/example.py --address 127.0.0.1:50051 --user alice

Prints one JSON line with what it did; exits non-zero if any step fails.
"""

import argparse
import hashlib
import json
import pathlib
import queue
import sys
import threading
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "generated"))

import grpc  # noqa: E402
from messaging.v1 import file_relay_pb2, file_relay_pb2_grpc  # noqa: E402
from messaging.v1 import messaging_pb2, messaging_pb2_grpc, resources_pb2  # noqa: E402

CHUNK = 256 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--user", default="alice", help="sent as x-user-id (trusted-header auth)")
    parser.add_argument("--token", help="a JWT, sent as authorization: Bearer (jwt auth)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args()

    identity = (
        [("authorization", f"Bearer {args.token}")] if args.token else [("x-user-id", args.user)]
    )
    channel = grpc.insecure_channel(args.address)
    messaging = messaging_pb2_grpc.MessagingServiceStub(channel)
    files = file_relay_pb2_grpc.FileRelayServiceStub(channel)

    conversation = messaging.CreateConversation(
        messaging_pb2.CreateConversationRequest(
            title="Python example",
            participant_ids=["bob"],
            request_id=str(uuid.uuid4()),
        ),
        metadata=identity,
        timeout=args.timeout,
    ).conversation

    # Subscribe before uploading; events arrive in sequence order on a thread of their own.
    events: "queue.Queue[resources_pb2.ConversationEvent]" = queue.Queue()
    subscription = messaging.SubscribeMessages(
        messaging_pb2.SubscribeMessagesRequest(
            conversation_id=conversation.conversation_id, after_sequence=0
        ),
        metadata=identity,
    )

    def pump() -> None:
        try:
            for response in subscription:
                events.put(response.event)
        except grpc.RpcError:
            pass  # cancelled below

    threading.Thread(target=pump, daemon=True).start()

    content = ("hello from Python\n" * 1000).encode()
    sha256 = hashlib.sha256(content).hexdigest()

    def upload_requests():
        yield file_relay_pb2.UploadFileRequest(
            metadata=file_relay_pb2.UploadMetadata(
                conversation_id=conversation.conversation_id,
                file_name="hello.txt",
                content_type="text/plain",
                size_bytes=len(content),
                sha256=sha256,
                caption="sent from the Python SDK",
                # Makes the upload resumable and safe to retry (see GetUploadStatus).
                request_id=str(uuid.uuid4()),
            )
        )
        for start in range(0, len(content), CHUNK):
            yield file_relay_pb2.UploadFileRequest(chunk=content[start : start + CHUNK])

    uploaded = files.UploadFile(upload_requests(), metadata=identity, timeout=args.timeout)

    # Wait for the FILE message on the live stream.
    received = None
    while received is None:
        event = events.get(timeout=args.timeout)
        if event.WhichOneof("event") == "message_created":
            message = event.message_created.message
            if message.type == resources_pb2.MESSAGE_TYPE_FILE:
                received = (event.sequence, message)
    subscription.cancel()

    sequence, message = received
    if message.file.file_id != uploaded.file.file_id or message.file.sha256 != sha256:
        print("the FILE message does not carry the uploaded file", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "conversation_id": conversation.conversation_id,
                "file_id": uploaded.file.file_id,
                "sha256": uploaded.file.sha256,
                "size_bytes": uploaded.file.size_bytes,
                "event_sequence": sequence,
                "message_id": message.message_id,
                "caption": message.text,
            }
        )
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        sys.exit(1)
