// svc-messaging from TypeScript (Node): create a conversation, subscribe to it, upload a file,
// and receive the FILE message the upload posted.
//
// Generate the SDK first (from the repository root):
//   buf generate --template sdk/buf.gen.yaml
// then, in sdk/typescript, with the packages of package.json installed:
//   npx tsc && node dist/example.js 127.0.0.1:50051 alice
import { createHash, randomUUID } from "node:crypto";

import { create } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import {
  FileRelayService,
  UploadFileRequestSchema,
  type UploadFileRequest,
} from "./generated/messaging/v1/file_relay_pb.js";
import { MessagingService } from "./generated/messaging/v1/messaging_pb.js";
import { MessageType } from "./generated/messaging/v1/resources_pb.js";

async function main(address: string, user: string): Promise<void> {
  const transport = createGrpcTransport({ baseUrl: `http://${address}` });
  const messaging = createClient(MessagingService, transport);
  const files = createClient(FileRelayService, transport);
  // Trusted-header identity; with auth.mode = "jwt" send `authorization: Bearer <token>`.
  const headers = { "x-user-id": user };

  const { conversation } = await messaging.createConversation(
    { title: "TypeScript example", participantIds: ["bob"], requestId: randomUUID() },
    { headers, timeoutMs: 10_000 },
  );
  if (!conversation) throw new Error("no conversation in the response");

  const subscription = new AbortController();
  const events = messaging.subscribeMessages(
    { conversationId: conversation.conversationId, afterSequence: 0n },
    { headers, signal: subscription.signal },
  );

  const content = new TextEncoder().encode("hello from TypeScript\n".repeat(1000));
  const sha256 = createHash("sha256").update(content).digest("hex");
  async function* requests(): AsyncGenerator<UploadFileRequest> {
    yield create(UploadFileRequestSchema, {
      payload: {
        case: "metadata",
        value: {
          conversationId: conversation!.conversationId,
          fileName: "hello.txt",
          contentType: "text/plain",
          sizeBytes: BigInt(content.length),
          sha256,
          caption: "sent from the TypeScript SDK",
          requestId: randomUUID(),
        },
      },
    });
    for (let start = 0; start < content.length; start += 256 * 1024) {
      yield create(UploadFileRequestSchema, {
        payload: { case: "chunk", value: content.subarray(start, start + 256 * 1024) },
      });
    }
  }
  const uploaded = await files.uploadFile(requests(), { headers, timeoutMs: 10_000 });

  for await (const { event } of events) {
    if (event?.event.case !== "messageCreated") continue;
    const message = event.event.value.message;
    if (message?.type !== MessageType.FILE) continue;
    if (message.file?.fileId !== uploaded.file?.fileId) {
      throw new Error("the FILE message does not carry the uploaded file");
    }
    console.log(JSON.stringify({ fileId: message.file?.fileId, sequence: String(event.sequence) }));
    break;
  }
  subscription.abort();
}

const [address = "127.0.0.1:50051", user = "alice"] = process.argv.slice(2);
main(address, user).catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
